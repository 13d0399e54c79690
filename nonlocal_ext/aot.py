"""Compile the shipped Triton kernel variants for real GPU targets without a GPU, and report their resources.

    python -m nonlocal_ext.aot --arch sm_80,sm_90 --json FILE [--set full|heavy|quick|targets] [--configs all]

Each variant is compiled with ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda",
cap, 32))`` at the default (first) configuration of its autotune list (:mod:`nonlocal_ext.triton_kernels.configs`);
the cubin is read with the ``cuobjdump --dump-resource-usage`` and ``nvdisasm`` that the triton wheel ships.
One JSON row per (kernel, variant, arch, config):

    kernel            forward | column | row | preprocess (the kernel family)
    variant           affinity-normalize-update[-symmetric]-dtype (plus the column pass phase)
    arch              sm_80 | sm_90
    registers         registers per thread
    spill_bytes       STACK + LOCAL bytes per thread (0 means no spills)
    shared_bytes      static shared memory (SHARED in the resource usage; the launch adds Triton's
                      dynamic shared memory, reported as shared_dynamic_bytes)
    mma_instructions  HMMA + HGMMA instructions in the SASS (tensor cores)
    mma_operand_types their operand types (F16, BF16, TF32)
    config            index in the autotune list (0: the default), with its tiles, num_warps, num_stages

The shipped set (default): every affinity kernel but ``dot`` (whose ``auto`` path is linear) × every
normalization × {aggregate, diffusion} × symmetric, in float16, bfloat16 and float32 for the forward,
column and row kernels (and the column-sum pass of ``sym``), is 4·4·2·2·3 = 192 combinations at each of the
four width classes, 2477 compilations per arch, a few seconds each. ``--set heavy`` compiles one
register-hungry variant of each affinity and dtype (sym + diffusion + symmetric; not always the hungriest:
the column pass of none/count/row with symmetric holds more); ``--set quick`` a covering subset for CI: every affinity, normalization, flag
and dtype at least once; ``--set targets`` the variants of the GPU targets (docs/gpu.md). ``--configs all``
compiles every configuration of each autotune list that is listed for the target instead of the
default one (the ``config`` field is the index in the list).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from .kernels import KERNELS
from .spec import NORMALIZATIONS

#: Every affinity kernel but ``dot`` (whose ``auto`` path is linear), in the registry's order.
AFFINITIES = tuple(name for name in KERNELS if name != "dot")
DTYPES = ("fp16", "bf16", "fp32")

#: (kernel, normalize, diffusion, symmetric, dtype) of the quick set.
QUICK = [
    ("gaussian", "row", False, False, "fp16"),
    ("rbf", "sym", True, True, "fp32"),
    ("fractional", "none", True, False, "fp16"),
    ("log", "count", False, True, "fp32"),
    ("gaussian", "sym", True, False, "bf16"),
]


#: (kernel, normalize, diffusion, symmetric, dtype, D): the direct-difference build (ρ from D ≤ 3 coordinates).
DIRECT = ("fractional", "count", True, False, "fp32", 2)

#: The variants behind the GPU targets (docs/gpu.md): gaussian + row (half inputs), fractional + row.
TARGETS = [
    ("gaussian", "row", False, False, "fp16"),
    ("gaussian", "row", False, False, "bf16"),
    ("fractional", "row", False, False, "fp16"),
    ("fractional", "row", False, False, "fp32"),
]


def _tools():
    import triton
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.join(base, "cuobjdump"), os.path.join(base, "nvdisasm")


def _spec(kernel, normalize, diffusion, symmetric):
    from .kernels import KERNELS, KernelParams
    from .spec import AggregateSpec
    return AggregateSpec(KERNELS[kernel], KernelParams(1.0, 1.5, 0.5, 1e-4), normalize,
                         "diffusion" if diffusion else "aggregate", symmetric)


def variants(which: str = "full", widths=None):
    """``(family, variant name, kernel, normalize, diffusion, symmetric, dtype, phase, even, width, direct)`` to
    compile.

    ``even``: feature tiles divide D and C (``EVEN_D = EVEN_C``, no column masks); the quick set adds
    the masked ("tail") build of its first two combinations, the heavy set that of each dtype's first.
    ``width``: the feature-width class whose tiles are compiled (:data:`~.triton_kernels.configs.WIDTH_CLASSES`;
    names carry ``-w<width>`` except for 64). ``widths`` None: every class; the quick set instead gives
    its combinations the classes in turn, so every class is compiled once. ``direct``: D of the
    direct-difference form of ρ (distance kernels with D ≤ 3; 0: the GEMM form); the quick and full sets
    add one such build of each kernel family (:data:`DIRECT`)."""
    from .triton_kernels.configs import WIDTH_CLASSES
    rows = []
    combos = list(itertools.product(AFFINITIES, NORMALIZATIONS, (False, True), (False, True), DTYPES))
    if which == "quick":  # CI: every affinity, normalization, flag and dtype at least once
        combos = QUICK
    elif which == "heavy":  # the most register-hungry variant of each affinity, in each dtype
        combos = [(k, "sym", True, True, dt) for k in AFFINITIES for dt in DTYPES]
    elif which == "targets":  # the variants of the GPU targets (docs/gpu.md)
        combos = TARGETS
    if which == "heavy":  # a masked build of each dtype's first combination
        tails = [next(c for c in combos if c[4] == dtype) for dtype in DTYPES]
    else:
        tails = combos[:2] if which == "quick" else []  # also compile masked feature tiles (EVEN_D = EVEN_C = False)
    builds = [(c, True) for c in combos] + [(c, False) for c in tails]
    if widths is None and which == "quick":
        builds = [(c, even, WIDTH_CLASSES[i % len(WIDTH_CLASSES)]) for i, (c, even) in enumerate(builds)]
    else:
        builds = [(c, even, w) for w in (WIDTH_CLASSES if widths is None else widths) for c, even in builds]
    from .triton_kernels.configs import configs_for
    compiled_lists = set()  # a backward list shared by several width classes is compiled once

    def first_time(family, combo_name, dtype, symmetric, width):
        key = (family, combo_name, id(configs_for(family, dtype == "fp32", symmetric, width)))
        new = key not in compiled_lists
        compiled_lists.add(key)
        return new

    for (kernel, normalize, diffusion, symmetric, dtype), even, width in builds:
        base = "-".join([kernel, normalize, "diffusion" if diffusion else "aggregate"]
                        + (["symmetric"] if symmetric else []) + [dtype] + ([] if even else ["tail"]))
        backward = first_time("column", base, dtype, symmetric, width) | first_time("row", base, dtype, symmetric,
                                                                                    width)
        name = "-".join([kernel, normalize, "diffusion" if diffusion else "aggregate"]
                        + (["symmetric"] if symmetric else []) + [dtype] + ([] if even else ["tail"])
                        + ([] if width == 64 else [f"w{width}"]))
        rows.append(("forward", name, kernel, normalize, diffusion, symmetric, dtype, None, even, width))
        if normalize == "sym" and width == WIDTH_CLASSES[0]:  # the column-sum pass: no value tile, one build
            rows.append(("forward", f"{name}-column_sums", kernel, normalize, diffusion, symmetric, dtype,
                         "column_sums", even, width))
        phases = ["dv_t", "dk"] if normalize == "sym" else ["dv_dk"]
        if not backward:
            continue
        for phase in phases:
            rows.append(("column", f"{name}-{phase}", kernel, normalize, diffusion, symmetric, dtype, phase, even,
                         width))
        rows.append(("row", name, kernel, normalize, diffusion, symmetric, dtype, None, even, width))
    rows.append(("preprocess", "diffusion-fp32", None, None, True, False, "fp32", None, False, 64))
    rows.append(("preprocess", "aggregate-fp32", None, None, False, False, "fp32", None, False, 64))
    rows = [row + (0,) for row in rows]
    if which in ("quick", "full"):
        kernel, normalize, diffusion, symmetric, dtype, direct = DIRECT
        name = "-".join([kernel, normalize, "diffusion" if diffusion else "aggregate", dtype, f"direct{direct}"])
        for family, phase in (("forward", None), ("column", "dv_dk"), ("row", None)):
            rows.append((family, name if phase is None else f"{name}-{phase}", kernel, normalize, diffusion,
                         symmetric, dtype, phase, False, 64, direct))
    return rows


def _signature(fn, constexprs, pointer_dtypes, int_type="i32"):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointer_dtypes.get(name, "fp32")
        else:
            sig[name] = int_type
    return sig


def compile_variant(row, arch: str, config_index: int = 0) -> dict:
    """Compile one variant for ``arch`` (``sm_80``) at entry ``config_index`` of its autotune list (0: the
    default) and return its JSON row."""
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_kernels import aggregate, configs
    from .triton_kernels.launchers import variant_constexprs

    family, name, kernel, normalize, diffusion, symmetric, dtype, phase, even, width, direct = row
    cap = int(arch.split("_")[1])
    input_type = dtype  # the Triton pointer type: fp16, bf16 or fp32
    if family == "preprocess":
        fn = aggregate.backward_preprocess_kernel
        config = configs.configs_for("preprocess", True)[config_index]
        constexprs = dict(DIFFUSION=diffusion, ACC_DTYPE=tl.float32, **config.kwargs)
        pointer_dtypes = {"g_ptr": input_type, "out_ptr": input_type, "u_ptr": input_type}
    else:
        fn = {"forward": aggregate.forward_kernel, "column": aggregate.backward_column_kernel,
              "row": aggregate.backward_row_kernel}[family]
        config = configs.configs_for(family, dtype == "fp32", symmetric, width)[config_index]
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        constexprs = variant_constexprs(_spec(kernel, normalize, diffusion, symmetric), torch_dtype,
                                        direct or None)
        if family == "forward":
            constexprs["WITH_VALUES"] = phase != "column_sums"
            if phase == "column_sums":
                constexprs["DIFFUSION"] = False
        if family == "column":
            constexprs["WITH_DV_T"] = phase in ("dv_t", "dv_dk")
            constexprs["WITH_DK"] = phase in ("dk", "dv_dk")
        constexprs.update(EVEN_D=even, EVEN_C=even, **config.kwargs)
        pointer_dtypes = {n: input_type for n in ("q_ptr", "k_ptr", "v_ptr", "u_ptr", "g_ptr")}
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    src = ASTSource(fn, _signature(fn, constexprs, pointer_dtypes), constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None:  # the register limit the autotuner passes to ptxas for this entry
        options["maxnreg"] = config.maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    usage = _resource_usage(compiled.asm["cubin"], arch)
    usage["dots"] = dot_layouts(compiled.asm["ttgir"])
    usage.update(kernel=family, variant=name, arch=arch,
                 shared_dynamic_bytes=int(compiled.metadata.shared),
                 config=config_index, num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.maxnreg,
                 blocks={k: v for k, v in config.kwargs.items()})
    return usage


#: Registers of one thread block (and of one SM) on sm_80 and sm_90; a thread's registers are allocated in
#: steps of 8.
REGISTER_FILE = 65536


def max_warps(registers: int) -> int:
    """The most warps one program can launch with at ``registers`` per thread: a launch whose block needs more
    than the register file fails (Triton raises ``OutOfResources``; the autotuner skips the entry). At 16 warps
    a kernel may use at most 128 registers; ``maxnreg`` lets ptxas go above that and build a kernel that
    compiles without spills but cannot launch."""
    return min(32, REGISTER_FILE // (-(-max(registers, 1) // 8) * 8 * 32))


def launchable(row: dict) -> bool:
    """Whether a compiled report row's block fits the register file (:func:`max_warps`)."""
    return row["num_warps"] <= max_warps(row["registers"])


def _operand_type(fields: str) -> str:
    """F16, BF16 or TF32 from the suffix of an HMMA/HGMMA instruction (``.16816.F32.BF16``)."""
    parts = fields.strip(".").split(".")
    if len(parts) == 2 and parts[1] in ("F32", "F16"):  # shape and accumulator: float16 operands
        return "F16"
    if len(parts) == 3 and parts[2] in ("BF16", "TF32"):
        return parts[2]
    return fields.strip(".") or "?"


def _resource_usage(cubin: bytes, arch: str) -> dict:
    cuobjdump, nvdisasm = _tools()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout

    def field(key):
        match = re.search(rf"\b{key}:(\d+)", usage)
        return int(match.group(1)) if match else 0

    # HMMA.16816.F32 (float16 operands), HMMA.16816.F32.BF16, HMMA.1688.F32.TF32, HGMMA.64x32x16.F32.BF16:
    # shape, accumulator type, then the operand type unless it is float16; another form is kept as it is
    mma = re.findall(r"\bH(?:G)?MMA((?:\.\w+)*)", sass)
    operands = {_operand_type(fields) for fields in mma}
    return dict(registers=field("REG"), spill_bytes=field("STACK") + field("LOCAL"), shared_bytes=field("SHARED"),
                mma_instructions=len(mma), mma_operand_types=sorted(operands))


_MMA_LAYOUT = re.compile(r"^#(mma\w*) = #ttg\.nvidia_mma<\{versionMajor = (\d+).*?warpsPerCTA = \[([\d, ]+)\]"
                         r".*?instrShape = \[([\d, ]+)\]", re.M)
_DOT_RESULT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot)\b.*-> tensor<((?:\d+x)+)\w+, #(mma\w*)>")


def dot_layouts(ttgir: str) -> list[dict]:
    """The tensor-core products of a kernel's TTGIR: output shape, warps per CTA along its rows and columns,
    instruction tile, and ``replication``: how many warps compute each instruction tile of the output (1: the
    warps split the output; a 16 × 16 product spread over 8 warps as 4 × 2 is computed 4 times, since its
    rows hold one 16-row instruction tile). One entry per distinct (shape, layout)."""
    def numbers(text):
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)

    layouts = {name: (int(version), numbers(warps), numbers(instr))
               for name, version, warps, instr in _MMA_LAYOUT.findall(ttgir)}
    found = {}
    for dims, name in _DOT_RESULT.findall(ttgir):
        version, warps, instr = layouts[name]
        shape = tuple(int(x) for x in dims.strip("x").split("x"))
        instr = (1,) * (len(shape) - len(instr)) + instr  # batched products: one batch element per instruction
        tiles = [-(-size // step) for size, step in zip(shape, instr)]
        replication = 1
        for w, t in zip(warps, tiles):
            replication *= max(1, w // t)
        found[(shape, warps, instr)] = dict(shape=list(shape), warps=list(warps), instr=list(instr),
                                            mma_version=version, replication=replication)
    return list(found.values())


def _job(args):
    row, arch, config_index = args
    try:
        return compile_variant(row, arch, config_index)
    except Exception as error:  # reported as a failed row, the test asserts there are none
        family, name = row[0], row[1]
        return dict(kernel=family, variant=name, arch=arch, config=config_index,
                    error=f"{type(error).__name__}: {error}"[:2000])


def config_indices(row, arch: str) -> list[int]:
    """Indices of the autotune list of ``row`` that are verified for ``arch`` (its target)."""
    from .triton_kernels import configs
    family, dtype, symmetric = row[0], row[6], row[5]
    cap = int(arch.split("_")[1])
    target = configs.target_of((cap // 10, cap % 10))
    return [i for i, c in enumerate(configs.configs_for(family, dtype == "fp32", symmetric, row[9]))
            if target in configs.archs_of(c)]


def run(archs, which="full", jobs=None, all_configs=False, widths=None):
    """Compile the set ``which`` for ``archs``: each variant at its default configuration, or at every
    configuration of its autotune list verified for the arch with ``all_configs``."""
    rows = [(row, arch, index) for row in variants(which, widths) for arch in archs
            for index in (config_indices(row, arch) if all_configs else [0])]
    jobs = jobs or max(1, min(len(rows), os.cpu_count() or 1))
    if jobs == 1:
        return [_job(r) for r in rows]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_job, rows))


def table(results) -> str:
    header = (f"{'kernel':<10} {'variant':<56} {'arch':<6} {'cfg':>3} {'tiles (I×J×D×C/warps/stages)':<28} "
              f"{'regs':>4} {'spill':>5} {'smem':>6} {'dyn smem':>8} {'mma':>5} operands")
    lines = [header, "-" * len(header)]
    for r in results:
        head = f"{r['kernel']:<10} {r['variant']:<56} {r['arch']:<6} {r.get('config', 0):>3}"
        if "error" in r:
            lines.append(f"{head} ERROR {r['error'][:120]}")
            continue
        b = r["blocks"]
        tiles = "×".join(str(b[k]) for k in ("BLOCK_I", "BLOCK_J", "BLOCK_D", "BLOCK_C") if k in b)
        tiles += f"→{b['OUT_D']}" if "OUT_D" in b else ""
        tiles += f"/{r['num_warps']}/{r['num_stages']}"
        lines.append(f"{head} {tiles:<28} {r['registers']:>4} {r['spill_bytes']:>5} "
                     f"{r['shared_bytes']:>6} {r['shared_dynamic_bytes']:>8} {r['mma_instructions']:>5} "
                     f"{'+'.join(r['mma_operand_types']) or '-'}")
    return "\n".join(lines)


def summary(results) -> str:
    """One line per (kernel family, dtype, arch, configuration): variant count and ranges over the variants."""
    groups = {}
    for r in results:
        if "error" in r:
            continue
        dtype = next(part for part in r["variant"].split("-") if part in DTYPES)
        width = next((int(p[1:]) for p in r["variant"].split("-") if p[0] == "w" and p[1:].isdigit()), 64)
        groups.setdefault((r["kernel"], dtype, width, r["arch"], r.get("config", 0)), []).append(r)
    header = (f"{'kernel':<10} {'dtype':<5} {'width':>5} {'arch':<6} {'cfg':>3} {'variants':>8} {'registers':>9} "
              f"{'max spill':>9} {'max smem+dyn':>12} {'mma':>7} {'warps':>5} launches")
    lines = [header, "-" * len(header)]
    for (kernel, dtype, width, arch, config), rows in sorted(groups.items()):
        regs = [r["registers"] for r in rows]
        mma = [r["mma_instructions"] for r in rows]
        smem = max(r["shared_bytes"] + r["shared_dynamic_bytes"] for r in rows)
        lines.append(f"{kernel:<10} {dtype:<5} {width:>5} {arch:<6} {config:>3} {len(rows):>8} {min(regs):>4}–{max(regs):<4} "
                     f"{max(r['spill_bytes'] for r in rows):>9} {smem:>12} {min(mma):>3}–{max(mma):<3} "
                     f"{rows[0]['num_warps']:>5} {'yes' if all(launchable(r) for r in rows) else 'NO'}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nonlocal_ext.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets, e.g. sm_80,sm_90")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--set", dest="which", choices=["full", "heavy", "quick", "targets"], default="full",
                        help="full: every shipped variant; heavy: the symmetric+sym+diffusion variant of each "
                             "affinity and dtype; quick: a covering subset of 5 (CI); targets: the variants of "
                             "the GPU targets of docs/gpu.md")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: CPU count)")
    parser.add_argument("--configs", choices=["default", "all"], default="default",
                        help="default: each variant at the first configuration of its autotune list; all: at "
                             "every configuration listed for the target")
    parser.add_argument("--widths", default=None,
                        help="comma-separated feature-width classes (64,128,256,512); default: all (the quick "
                             "set: each class once)")
    args = parser.parse_args(argv)
    widths = None if args.widths is None else [int(w) for w in args.widths.split(",")]
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for arch in archs:
        if not re.fullmatch(r"sm_\d+", arch):
            parser.error(f"--arch takes targets like sm_80, got {arch!r}")
    results = run(archs, which=args.which, jobs=args.jobs, all_configs=args.configs == "all", widths=widths)
    print(table(results))
    print()
    print(summary(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
