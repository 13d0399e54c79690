"""What this installation has: ``python -m nonlocal_ext.info [--json]``.

Versions (nonlocal_ext, torch and its CUDA, triton, Python); how the C++ kernels were loaded
(ahead of time, compiled on first use, or missing and why); the CPU code path they run
(AVX-512, AVX2+FMA or baseline) and the CPU's matrix units; the GPUs and whether the Triton tile
configurations are checked for them; the backends available for CPU and CUDA tensors and what
``backend="auto"`` picks for typical calls. Paste its output into a bug report.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import torch

import nonlocal_ext
from nonlocal_ext import _extension, backends
from nonlocal_ext.spec import validate

#: x86-64 micro-architecture levels as /proc/cpuinfo names their features: the float32 tile code
#: is compiled once per level (GCC target_clones "arch=x86-64-v4", "arch=x86-64-v3", "default")
#: and the loader picks the highest level the CPU supports.
_X86_64_V2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}
_X86_64_V3 = _X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
#: A symbol part of the x86-64-v4 clone: present only in a library built with the clones.
_CLONE_MARK = b"arch_x86_64_v4"

#: Typical calls for "what auto picks": (label, kernel, extra arguments, B, N, M, D, C).
TYPICAL_CALLS = [
    ("attention-like, small", "gaussian", {}, 1, 256, 256, 64, 128),
    ("attention-like", "gaussian", {}, 1, 4096, 4096, 64, 128),
    ("nonlocal block, fractional Laplacian", "fractional", {"power": 3.0}, 2, 1024, 256, 256, 256),
    ("dot product", "dot", {}, 2, 1024, 256, 256, 256),
]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton() -> dict:
    try:
        import triton
    except Exception as error:  # not installed, or broken
        return {"version": None, "error": f"{type(error).__name__}: {error}"}
    return {"version": triton.__version__, "error": None}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_code_path(library: str | None, flags: set[str], machine: str) -> str:
    """The code path of the float32 tile loops in this library on this CPU."""
    if library is None:
        return "none (the C++ kernels are not loaded)"
    if machine not in ("x86_64", "AMD64") or _CLONE_MARK not in Path(library).read_bytes():
        return "baseline (this build has no per-ISA clones)"
    if _X86_64_V4 <= flags:
        return "AVX-512 (x86-64-v4)"
    if _X86_64_V3 <= flags:
        return "AVX2+FMA (x86-64-v3)"
    return "baseline x86-64"


def _typical_calls(device: str) -> tuple[list[str], list[dict]]:
    """Backends available for the typical calls on `device`, and what auto picks for each call."""
    available, picks = set(), []
    for label, kernel, extra, b, n, m, d, c in TYPICAL_CALLS:
        q, k, v = (torch.empty(b, rows, cols, device=device) for rows, cols in ((n, d), (m, d), (m, c)))
        spec = validate(q, k, v, kernel, scale=1.0, power=extra.get("power"), gamma=extra.get("gamma"),
                        eps=None, normalize="row", update="aggregate", symmetric=False, self_value=None,
                        backend="auto")
        available.update(backends.available(spec, q))
        shape = f"B={b} N={n} M={m} D={d} C={c} float32"
        picks.append({"call": f"{label}: {kernel}, row, {shape}", "auto": backends.select("auto", spec, q, k, v).NAME})
    return [name for name in backends.BACKENDS if name in available], picks


def _gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    try:
        from nonlocal_ext.triton_kernels.configs import SM80, SM90
        checked = (SM80, SM90)
    except Exception:  # triton missing: nothing is checked
        checked = ()
    gpus = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        arch = f"sm_{major}{minor}"
        gpus.append({"name": torch.cuda.get_device_name(index), "arch": arch,
                     "triton_configs": "checked" if arch in checked else "unchecked"})
    return gpus


def collect() -> dict:
    """Everything ``python -m nonlocal_ext.info`` prints, as plain data."""
    flags = _cpu_flags()
    machine = platform.machine()
    ext = dict(_extension.status)
    cpu_backends, cpu_picks = _typical_calls("cpu")
    if torch.cuda.is_available():
        cuda_backends, cuda_picks = _typical_calls("cuda")
        cuda_note = None
    else:
        cuda_backends, cuda_picks = [], []
        cuda_note = "no CUDA device (torch.cuda.is_available() is False)"
    return {
        "nonlocal_ext": {"version": nonlocal_ext.__version__, "metadata_version": _version("nonlocal_ext"),
                         "path": str(Path(nonlocal_ext.__file__).parent)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "platform": f"{platform.system()} {machine}"},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "git": torch.version.git_version,
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "triton": _triton(),
        "cpp_kernels": ext,
        "cpu": {"model": _cpu_model(), "code_path": cpu_code_path(ext["path"], flags, machine),
                "matrix_units": sorted(f for f in flags if f.startswith("amx"))},
        "gpus": _gpus(),
        "backends": {"cpu": cpu_backends, "cuda": cuda_backends, "cuda_note": cuda_note},
        "auto": {"cpu": cpu_picks, "cuda": cuda_picks},
    }


def format_text(info: dict) -> str:
    ext = info["cpp_kernels"]
    how = {"ahead-of-time": "built ahead of time (nonlocal_ext._C)", "jit": "compiled on first use",
           "missing": "MISSING"}[ext["how"]]
    lines = [
        f"nonlocal_ext  {info['nonlocal_ext']['version']} (installed metadata: "
        f"{info['nonlocal_ext']['metadata_version'] or 'none, not installed'}) at {info['nonlocal_ext']['path']}",
        f"python        {info['python']['version']} ({info['python']['implementation']}, {info['python']['platform']})",
        f"torch         {info['torch']['version']} (CUDA {info['torch']['cuda'] or 'none'}, "
        f"git {info['torch']['git'][:12]}, torch's CPU capability {info['torch']['cpu_capability']})",
        f"triton        {info['triton']['version'] or 'not importable: ' + info['triton']['error']}",
        f"C++ kernels   {how}" + (f": {ext['path']}" if ext["path"] else ""),
    ]
    if ext["compile_seconds"] is not None:
        lines.append(f"              compiled in this process in {ext['compile_seconds']} s")
    if ext["detail"]:
        lines.append(f"              {'why' if ext['how'] == 'missing' else 'not ahead of time'}: {ext['detail']}")
    units = ", ".join(info["cpu"]["matrix_units"]) or "none"
    lines += [
        f"CPU           {info['cpu']['model']}",
        f"              code path {info['cpu']['code_path']}; matrix units (AMX): {units}",
    ]
    if info["gpus"]:
        for gpu in info["gpus"]:
            lines.append(f"GPU           {gpu['name']} ({gpu['arch']}; Triton configs {gpu['triton_configs']}, "
                         "checked for sm_80 and sm_90)")
    else:
        lines.append("GPU           none")
    lines.append(f"backends      CPU tensors: {', '.join(info['backends']['cpu'])}")
    lines.append("              CUDA tensors: " + (", ".join(info["backends"]["cuda"]) or info["backends"]["cuda_note"]))
    for device in ("cpu", "cuda"):
        for row in info["auto"][device]:
            lines.append(f"auto, {device:<4}    {row['auto']:<10} for {row['call']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nonlocal_ext.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
