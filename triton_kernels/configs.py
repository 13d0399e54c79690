"""Tile configurations: the autotune lists for sm_80 / sm_90, the interpreter's, and the AOT defaults.

Autotune keys are bucketed (next power of two of N, M, D, C, at least 16) plus the constexprs that
select the variant, so a new N within a bucket does not retune. ``EVEN_D`` / ``EVEN_C`` are
``triton.heuristics``: feature tiles that divide D (C) load without a column mask.

The first configuration of each list is the default the AOT report (``python -m nonlocal_ext.aot``)
compiles: it must fit the register file of sm_80 and sm_90 with no spills at every variant.
The backward kernels hold up to three accumulators of BLOCK × BLOCK_D/C plus the recomputed tile (two
GEMMs with ``symmetric``), hence smaller tiles than the forward. Measured with the AOT report (sm_80,
gaussian + sym + diffusion + symmetric, fp16, the heaviest variant): backward 64×32 tiles spill
160–336 bytes at 8 warps, 32×32 tiles at 4 warps with 64-wide feature tiles spill 456; 32×32 at 8 warps
and the forward's 64×32 at 8 warps spill nothing. The full AOT set then showed 8–16 byte spills on
sm_90 in the combined (dv + dk) column pass of symmetric half variants: 32-wide feature tiles fix them;
the remaining four (half `sym` column passes without `symmetric`) take 4 warps (COLUMN_CONFIGS_NONSYMMETRIC).
"""

from __future__ import annotations

import triton


#: The two targets every configuration is compiled for by ``python -m nonlocal_ext.aot``.
SM80, SM90 = "sm_80", "sm_90"


#: id(config) -> the targets on which that configuration compiled without spills. Kept beside the
#: triton.Config objects, not on them: the autotuner's disk cache rebuilds configs as
#: ``Config(**config.__dict__)``, which an extra attribute would break.
_ARCHS: dict[int, tuple[str, ...]] = {}


def _config(block_i, block_j, block_d, block_c, warps, stages, archs=(SM80, SM90)):
    """A tile configuration (None: the kernel has no such tile); ``archs``: the targets on which it
    compiled without spills (see below)."""
    blocks = {"BLOCK_I": block_i, "BLOCK_J": block_j, "BLOCK_D": block_d, "BLOCK_C": block_c}
    config = triton.Config({name: size for name, size in blocks.items() if size is not None},
                           num_warps=warps, num_stages=stages)
    _ARCHS[id(config)] = archs
    return config


def archs_of(config) -> tuple[str, ...]:
    """The targets a configuration of these lists is verified for."""
    return _ARCHS[id(config)]


# Every entry below compiled without spills on the targets in its `archs` in the heaviest variant
# of each affinity and dtype and in the variants of the README's GPU targets
# (`python -m nonlocal_ext.aot --set heavy --configs all` and `--set targets --configs all`,
# bench/results/aot_configs.json; tests/test_aot.py checks the lists against that file). Dropped
# after that run (maximum spill bytes on sm_80 / sm_90): forward half 128×64×64×64/8 warps (816/768)
# and 128×32/4 warps/3 stages (2432/1784); forward float32 32×32/4 warps (56/96) and 64×32×64×64
# (576/408); column half 64×32×64×64 (240/96) and 32×64×64×64 (504/456); float32 backward 32×32 tiles
# (264–800); row half 64×32 and 64×64 (480–1352).

FORWARD_CONFIGS = [
    _config(64, 32, 64, 64, 8, 1),
    _config(64, 64, 64, 64, 8, 2, archs=(SM90,)),  # 120 spill bytes on sm_80
    _config(64, 32, 32, 64, 4, 3),
    _config(32, 32, 32, 32, 4, 2),
    _config(64, 64, 32, 128, 8, 2),
]

COLUMN_CONFIGS = [
    _config(32, 32, 32, 32, 8, 1),
    _config(32, 32, 64, 64, 8, 1),
    _config(32, 32, 32, 32, 4, 1, archs=(SM90,)),  # 8 spill bytes on sm_80
]

ROW_CONFIGS = [
    _config(32, 32, 64, 64, 8, 1),
    _config(32, 32, 32, 32, 4, 1, archs=(SM80,)),  # 120 spill bytes on sm_90
]

# float32 inputs: every tl.dot is tf32x3 (three tensor-core products on split operands), and the
# register use grows accordingly. Measured (sm_80, log + count + symmetric, fp32): backward 32×32 tiles
# with 32-wide feature tiles spill 624 bytes at 4 warps and 400 at 8; 16×16 tiles spill nothing
# (255 and 222 registers). Forward 32×32×32×32 spills at 4 warps (56 / 96 bytes on sm_80 / sm_90 in
# the heavy variants); 64×32 at 8 warps none.
# The full AOT set showed 24–40 byte spills on sm_90 for 16×16 backward tiles at 4 warps: 8 warps.
# Wider value tiles (BLOCK_C 64, 128) let one program cover C = 64…128, so the pair tile is computed
# once per row block instead of once per 32 output columns (bench/NOTES_triton.md).
FORWARD_CONFIGS_FP32 = [
    _config(32, 32, 32, 32, 8, 1),
    _config(64, 32, 32, 32, 8, 1),
    _config(32, 32, 32, 64, 8, 1),
    _config(32, 32, 32, 128, 8, 1),
    _config(64, 32, 32, 64, 8, 1, archs=(SM90,)),  # 24 spill bytes on sm_80
]

# Half column passes without `symmetric` (one recomputed product per tile): at 8 warps ptxas caps
# four `sym` variants on sm_90 at 128 registers and they spill 8–16 bytes; at 4 warps all 40 such
# variants compile spill-free on sm_80 and sm_90 (while 4 warps make 21 symmetric ones spill up to
# 216 bytes, hence a separate default).
COLUMN_CONFIGS_NONSYMMETRIC = [
    _config(32, 32, 32, 32, 4, 1),
    _config(32, 32, 32, 32, 8, 1),
    _config(32, 32, 64, 64, 8, 1),
    _config(64, 32, 64, 64, 8, 1, archs=(SM90,)),  # 72 spill bytes on sm_80
]

# Both float32 backward passes: the same register budget (one recomputed tile, two accumulators).
BACKWARD_CONFIGS_FP32 = [
    _config(16, 16, 32, 32, 8, 1),
    _config(16, 16, 32, 32, 4, 1),
]

PREPROCESS_CONFIGS = [
    _config(32, None, None, 64, 4, 1),
    _config(64, None, None, 64, 8, 1),
]

#: Under TRITON_INTERPRET=1: small tiles so that the tests' odd sizes span several tiles.
INTERPRETER_BLOCKS = {"BLOCK_I": 32, "BLOCK_J": 32, "BLOCK_D": 64, "BLOCK_C": 64}

#: Keys of the bucketed autotune cache (besides the variant's constexprs).
BUCKET_KEYS = ["n_bucket", "m_bucket", "d_bucket", "c_bucket"]
VARIANT_KEYS = ["KERNEL", "LOG_DOMAIN", "SYMMETRIC", "NORMALIZE", "DIFFUSION", "ACC_DTYPE"]


def bucket(size: int) -> int:
    """The autotune bucket of a size: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(1, size)))


def even_heuristics():
    """Tail-tile heuristics: a feature dimension that the tile divides needs no mask."""
    return {
        "EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0,
        "EVEN_C": lambda args: args["C"] % args["BLOCK_C"] == 0,
    }


_CONFIGS = {
    ("forward", False): FORWARD_CONFIGS, ("forward", True): FORWARD_CONFIGS_FP32,
    ("column", False): COLUMN_CONFIGS, ("column", True): BACKWARD_CONFIGS_FP32,
    ("row", False): ROW_CONFIGS, ("row", True): BACKWARD_CONFIGS_FP32,
    ("preprocess", False): PREPROCESS_CONFIGS, ("preprocess", True): PREPROCESS_CONFIGS,
}

_BY_TARGET = {}


def configs_for(family: str, fp32: bool, symmetric: bool = True) -> list:
    """The autotune list of a kernel family (forward, column, row, preprocess); the first is the default.

    ``fp32``: float32 (or float64) inputs, whose tf32x3 products need smaller tiles than half inputs.
    ``symmetric``: the variant's ``symmetric`` flag (half column passes without it default to 4 warps).
    """
    if family == "column" and not fp32 and not symmetric:
        return COLUMN_CONFIGS_NONSYMMETRIC
    return _CONFIGS[(family, fp32)]


def for_target(configs: list, target: str) -> list:
    """The entries of ``configs`` verified for ``target`` (``sm_80`` or ``sm_90``), the default first;
    the same list object for the same arguments (the autotuner cache is keyed by it)."""
    key = (id(configs), target)
    if key not in _BY_TARGET:
        _BY_TARGET[key] = [c for c in configs if target in archs_of(c)]
    return _BY_TARGET[key]


def target_of(capability: tuple[int, int]) -> str:
    """The verified target whose configurations a GPU of compute ``capability`` autotunes over:
    sm_90 for Hopper and later, sm_80 below."""
    return SM90 if capability[0] >= 9 else SM80
