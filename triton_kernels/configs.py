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


def _config(block_i, block_j, block_d, block_c, warps, stages, archs=(SM80, SM90), out=None, maxnreg=None,
            slice=None, split_k=1):
    """A tile configuration (None: the kernel has no such tile); ``archs``: the targets on which it
    compiled without spills (see below). ``out``: the backward kernels' output feature tile
    (``OUT_D = OUT_C``); their ``BLOCK_D`` / ``BLOCK_C`` are the slices of the recomputed GEMMs, and their
    accumulators are tuples of ``slice``-wide tiles (``SLICE``; None: one tile of the output width).
    ``split_k``: the pair-tile products (q kᵀ, G vᵀ) as batched products over that many chunks of each
    BLOCK_D / BLOCK_C slice, one warp per chunk (``SPLIT_K``, :func:`.tiles.tile_dot`).
    ``maxnreg``: the register limit passed to ptxas (None: its own choice, which at 8 warps is sometimes
    128 or 80 registers and then spills)."""
    blocks = {"BLOCK_I": block_i, "BLOCK_J": block_j, "BLOCK_D": block_d, "BLOCK_C": block_c,
              "OUT_D": out, "OUT_C": out, "SLICE": None if out is None else slice or out,
              "SPLIT_K": None if block_j is None else split_k}
    config = triton.Config({name: size for name, size in blocks.items() if size is not None},
                           num_warps=warps, num_stages=stages, maxnreg=maxnreg)
    _ARCHS[id(config)] = archs
    return config


def archs_of(config) -> tuple[str, ...]:
    """The targets a configuration of these lists is verified for."""
    return _ARCHS[id(config)]


#: (kernel family, id(config)) -> (pair-tile copies, value-product copies), as :data:`_ARCHS`; filled below.
_COPIES: dict[tuple[str, int], tuple[int, int]] = {}


#: The development pin (requirements-dev.txt): the Triton release bench/results/aot_configs.json is compiled with.
PINNED_TRITON = "3.9"

#: (release, family, id(config)) -> copies where a supported Triton release other than the pin lays an entry out
#: differently (filled below; ``make triton-compat`` compiles the quick set under that release).
_COPIES_UNDER: dict[tuple[str, str, int], tuple[int, int]] = {}


def _release(version: str) -> str:
    return ".".join(version.split(".")[:2])


def replication_of(family: str, config, triton_version: str | None = None) -> tuple[int, int]:
    """How many warps compute each 16 × 8 tensor-core tile of a configuration's pair tiles (q kᵀ, G vᵀ) and of
    its products into the accumulators, on sm_90 (the layouts of the compiled kernels, ``aot.dot_layouts``;
    1: the warps split the output). A 16-row × 16-column tile has two instruction tiles: at 8 warps Triton lays
    the warps out 4 × 2 (each tile computed 4 times) or 8 × 1 (8 times). The backward from class 128 on
    splits its pair tiles over the warps (``SPLIT_K``) and repeats nothing; wider row tiles instead did not fit
    beside 512-column accumulators (32- and 64-row column tiles spilled 112–552 bytes at 512).
    ``family``: forward, column or row (the backward lists serve both passes, whose layouts differ).
    ``triton_version``: the release whose layouts to give (None: the one imported); the layouts are those of
    :data:`PINNED_TRITON` except where :data:`_COPIES_UNDER` records another release's."""
    release = _release(triton_version or triton.__version__)
    return _COPIES_UNDER.get((release, family, id(config)), _COPIES[family, id(config)])


# Every entry below compiled without spills on the targets in its `archs` in the heaviest variant
# of each affinity and dtype and in the variants of the GPU targets (docs/gpu.md)
# (`python -m nonlocal_ext.aot --set heavy --configs all` and `--set targets --configs all`,
# bench/results/aot_configs.json; tests/test_aot.py checks the lists against that file). Dropped
# after that run (maximum spill bytes on sm_80 / sm_90): forward half 128×64×64×64/8 warps (816/768)
# and 128×32/4 warps/3 stages (2432/1784); forward float32 32×32/4 warps (56/96) and 64×32×64×64
# (576/408); column half 64×32×64×64 (240/96) and 32×64×64×64 (504/456); float32 backward 32×32 tiles
# (264–800); row half 64×32 and 64×64 (480–1352).

# Width class 64 (the lists autotuned before wide tiles; every forward entry's BLOCK_C is ≥ 64).
FORWARD_CONFIGS = [
    _config(64, 32, 64, 64, 8, 1),
    _config(64, 64, 64, 64, 8, 2, archs=(SM90,)),  # 120 spill bytes on sm_80
    _config(64, 32, 32, 64, 4, 3),
    _config(64, 64, 32, 128, 8, 2),
]

# float32 inputs: every tl.dot is tf32x3 (three tensor-core products on split operands), and the
# register use grows accordingly. Forward 32×32×32×32 spills at 4 warps (56 / 96 bytes on sm_80 /
# sm_90 in the heavy variants); 64×32 at 8 warps none. BLOCK_C 32 (the default before wide tiles)
# is gone: at C = 64 it computed every pair tile twice.
FORWARD_CONFIGS_FP32 = [
    _config(32, 32, 32, 64, 8, 1),
    _config(32, 32, 32, 128, 8, 1),
    _config(64, 32, 32, 64, 8, 1, archs=(SM90,)),  # 24 spill bytes on sm_80
]

# Backward, width class 64: output feature tiles OUT_D = OUT_C = 64 (one program per row or column block
# for D, C ≤ 64), GEMM slices BLOCK_D = BLOCK_C of 32 (half column pass, float32) or 64 (half row pass).
# Each accumulator keeps the footprint (rows × output width) of the tiles the full AOT set verified before
# wide tiles: 32 × 32 in the half column pass (hence BLOCK_J 16), 32 × 64 in the half row pass. Half
# column passes without `symmetric` take 4 warps: at 8, ptxas capped four `sym` variants on sm_90 at 128
# registers and they spilled 8–16 bytes. The register limit is 255 (``maxnreg``) as in the wide classes:
# without it ptxas held 36 column builds of the full AOT set at 64–128 registers, and they spilled 8–24
# bytes. The half row pass with `symmetric` (two accumulators: dq and dk′) takes 16-row tiles: at 32 rows six
# `gaussian` `diffusion` builds spilled 8–24 bytes on sm_90 at 255 registers (bench/NOTES_triton.md, "Class 64
# spill-free").
COLUMN_CONFIGS = [_config(16, 16, 32, 32, 8, 1, out=64, maxnreg=255)]  # 32 × 16 spilled 8 bytes on sm_90 after the sliced epilogue
COLUMN_CONFIGS_NONSYMMETRIC = [_config(16, 16, 32, 32, 4, 1, out=64, maxnreg=255)]
ROW_CONFIGS = [_config(32, 32, 64, 64, 8, 1, out=64)]
ROW_CONFIGS_SYMMETRIC = [_config(16, 32, 64, 64, 8, 1, out=64, maxnreg=255)]
BACKWARD_CONFIGS_FP32 = [_config(16, 16, 32, 32, 8, 1, out=64, maxnreg=255)]

# Backward, width classes 128 and above: the output tiles are the class width (OUT_D = OUT_C = 128, 256,
# 512), so one column and one row program per block cover all of D and C and each pass computes every
# tile once (twice from 1024 on). That fits in 16 × 16 tiles because the epilogues that add a row-scaled
# input tile (q_i, k_j, u_i) to the accumulator run after it is stored, in 64-column slices
# (tiles.scaled_rows_into): before that change the 512-wide row pass spilled 16–1848 bytes (the input
# tile and the accumulator were live together). What spilled after that (8–40 bytes in 10 of ~800 builds
# of the AOT heavy and target sets, with 32- or 16-wide GEMM slices) were builds that ptxas had held at 128
# or 80 registers on its own; with the limit set to 255 (``maxnreg``) they use 130–205 and spill nothing.
# The pair tiles (q kᵀ, G vᵀ: 16 × 16, two tensor-core instruction tiles) are batched products over one chunk of
# 16 columns per warp (``split_k`` = warps, slices of 16 × warps columns): as plain products over 8 warps, each
# instruction tile was computed by 4 or 8 warps (bench/NOTES_triton.md, "Warps that repeated the pair tiles").
# The passes that hold more (float32 column, 512-wide) are below.
BACKWARD_WIDE = {128: [_config(16, 16, 128, 128, 8, 1, out=128, maxnreg=255, split_k=8)],
                 256: [_config(16, 16, 128, 128, 8, 1, out=256, maxnreg=255, split_k=8)],
                 512: [_config(16, 16, 128, 128, 8, 1, out=512, maxnreg=255, split_k=8)]}

PREPROCESS_CONFIGS = [
    _config(32, None, None, 64, 4, 1),
    _config(64, None, None, 64, 8, 1),
]

#: Feature-width classes. A call's class is the next power of two of its feature width (C for the
#: forward, max(D, C) for the backward passes), clamped to 64…512. Every forward configuration of a
#: class's list covers the class width in one program (BLOCK_C), so the forward computes each affinity
#: tile once per row block for C ≤ 512 and ⌈C / 512⌉ times above; the backward's output tiles
#: (OUT_D = OUT_C) are the class width too, so each backward pass computes every tile once for D, C ≤ 512
#: and ⌈max(D, C) / 512⌉ times above (the work model, :mod:`.work_model`, counts it), except where the
#: 512-wide layouts did not fit the register file (see below): at 512 the float32 column pass, and with
#: ``symmetric`` the half column pass and the float32 row pass, run 256-wide output tiles, two programs per
#: block. Wider value tiles are paid with fewer rows per program.
WIDTH_CLASSES = (64, 128, 256, 512)

# float32 at 512: 16×16×32×512 spilled 336–1760 bytes in the diffusion variants while the epilogue's u tile
# was live beside the accumulator; with the sliced epilogue it compiles without spills.
FORWARD_CONFIGS_FP32_WIDE = {256: [_config(16, 32, 32, 256, 8, 1)], 512: [_config(16, 16, 32, 512, 8, 1)]}

_WIDE = {
    # family, fp32, symmetric: {width class: list}
    ("forward", False): {
        64: FORWARD_CONFIGS,
        128: [_config(64, 32, 64, 128, 8, 1), _config(64, 64, 32, 128, 8, 2)],
        256: [_config(32, 32, 64, 256, 8, 1)],
        512: [_config(16, 32, 64, 512, 8, 1)],
    },
    ("forward", True): {
        64: FORWARD_CONFIGS_FP32,
        128: [_config(32, 32, 32, 128, 8, 1)],
        **FORWARD_CONFIGS_FP32_WIDE,
    },
    # backward: (family, fp32, symmetric); one list object for the wide classes (the same kernels)
    ("column", False, True): {64: COLUMN_CONFIGS},
    ("column", False, False): {64: COLUMN_CONFIGS_NONSYMMETRIC},
    ("row", False, False): {64: ROW_CONFIGS},
    ("row", False, True): {64: ROW_CONFIGS_SYMMETRIC},
    ("column", True, True): {64: BACKWARD_CONFIGS_FP32},
    ("column", True, False): {64: BACKWARD_CONFIGS_FP32},
    ("row", True, False): {64: BACKWARD_CONFIGS_FP32},
    ("row", True, True): {64: BACKWARD_CONFIGS_FP32},
}
for _key, _lists in _WIDE.items():
    if _key[0] != "forward":
        _lists.update(BACKWARD_WIDE)
# A block launches only if its registers fit the 64 K of the register file (nonlocal_ext.aot.max_warps): at 8
# warps up to 255 per thread, at 16 warps up to 128. Every backward entry therefore takes 8 warps with the
# limit at 255. (Until 2026-12-07 the wider passes below took 16 warps at up to 240 registers: they compiled
# without spills and could not have launched; bench/NOTES_triton.md, "Blocks that did not fit the register
# file".) At 8 warps:
# * the half column pass at 512 covers the class in one program with 128-wide accumulator slices, as does the
#   float32 row pass at 512; with ``symmetric`` (three accumulators in the column pass, two in the row pass)
#   every 512-wide layout tried spilled (8–144 bytes), and those passes take the class-256 entry: two feature
#   programs per block at 512;
# * the float32 column pass (dv and dk in tf32x3) covers 256 in one program (128-wide slices; with
#   ``symmetric``, whose three accumulators spilled 8–32 bytes there, 64-wide slices in 4 chunks, which sm_90
#   still lays out without repeated tiles); at 512 it spilled 8–112 bytes in 8 chunks of 128-wide slices, and
#   8–24 bytes on sm_80 in 4 chunks of 64-wide ones (clean on sm_90 alone): it takes the class-256 entry there.
FP32_COLUMN_256 = [_config(16, 16, 128, 128, 8, 1, out=256, maxnreg=255, slice=128, split_k=8)]
FP32_SYMMETRIC_COLUMN_256 = [_config(16, 16, 64, 64, 8, 1, out=256, maxnreg=255, slice=64, split_k=4)]
SLICED_512 = [_config(16, 16, 128, 128, 8, 1, out=512, maxnreg=255, slice=128, split_k=8)]
for _symmetric in (False, True):
    _fp32_column = FP32_SYMMETRIC_COLUMN_256 if _symmetric else FP32_COLUMN_256
    _WIDE[("column", True, _symmetric)].update({256: _fp32_column, 512: _fp32_column})
    _WIDE[("column", False, _symmetric)][512] = BACKWARD_WIDE[256] if _symmetric else SLICED_512
    _WIDE[("row", True, _symmetric)][512] = BACKWARD_WIDE[256] if _symmetric else SLICED_512

# Repeated instruction tiles, measured: the most warps computing one 16 × 8 tile of the pair tiles (q kᵀ, G vᵀ;
# BLOCK_I × BLOCK_J) and of the products into the accumulators, over every variant compiled from the entry
# (bench/results/aot_configs.json, sm_90; `aot.dot_layouts`; tests/test_aot.py checks each against it). The
# 16 × 16 pair tiles of class 64's backward have two instruction tiles for 4 or 8 warps, laid out 2 × 2, 4 × 2
# or 8 × 1: each tile computed 2 to 8 times; the forward's small float32 and 512-wide tiles 2 to 8 times.
def _measured(family, lists, copies):
    for lst in lists:
        for config in lst:
            _COPIES[family, id(config)] = copies


_measured("forward", [FORWARD_CONFIGS, _WIDE[("forward", False)][128], _WIDE[("forward", False)][256]], (1, 1))
_measured("forward", [_WIDE[("forward", False)][512], FORWARD_CONFIGS_FP32_WIDE[256]], (2, 1))
_measured("forward", [FORWARD_CONFIGS_FP32, _WIDE[("forward", True)][128]], (4, 1))
_COPIES["forward", id(FORWARD_CONFIGS_FP32[2])] = (2, 2)  # 64 × 32 (sm_90 only)
_measured("forward", [FORWARD_CONFIGS_FP32_WIDE[512]], (8, 1))
_measured("column", [BACKWARD_CONFIGS_FP32], (8, 1))
_measured("column", [COLUMN_CONFIGS_NONSYMMETRIC], (2, 1))  # 4 warps
_measured("column", [COLUMN_CONFIGS], (4, 1))
_measured("row", [ROW_CONFIGS], (1, 1))
_measured("row", [ROW_CONFIGS_SYMMETRIC], (2, 1))  # 16 × 32: four instruction tiles over 8 warps
_measured("row", [BACKWARD_CONFIGS_FP32], (8, 1))
for _family in ("column", "row"):  # the split pair tiles: one warp per chunk
    _measured(_family, [*BACKWARD_WIDE.values(), FP32_COLUMN_256, SLICED_512], (1, 1))
_measured("column", [FP32_SYMMETRIC_COLUMN_256], (1, 1))  # 4 chunks over 8 warps, none repeated on sm_90
# Triton 3.8 (what torch 2.14's CUDA build brings) gives the 4 chunks' remaining factor of 2 warps to the 16 rows
# of the pair tile, not to its two column halves: each pair-tile instruction tile is computed twice, on sm_80 and
# sm_90 (the quick set under `make triton-compat`). Every 8-chunk layout tried instead spilled (8–16 bytes in
# 4–18 of 80 builds), and 4 warps 24–88 bytes (bench/NOTES_triton.md, "Layouts that differ under Triton 3.8").
_COPIES_UNDER["3.8", "column", id(FP32_SYMMETRIC_COLUMN_256[0])] = (2, 1)

#: Under TRITON_INTERPRET=1: small tiles so that the tests' odd sizes span several tiles; the feature
#: tiles (forward BLOCK_C, backward OUT_D / OUT_C) are the width class's, as on a GPU.
INTERPRETER_BLOCKS = {"BLOCK_I": 32, "BLOCK_J": 32, "BLOCK_D": 64, "BLOCK_C": 64}

#: Keys of the bucketed autotune cache (besides the variant's constexprs).
BUCKET_KEYS = ["n_bucket", "m_bucket", "d_bucket", "c_bucket"]
VARIANT_KEYS = ["KERNEL", "SYMMETRIC", "NORMALIZE", "DIFFUSION", "ACC_DTYPE", "DIRECT_D"]


def bucket(size: int) -> int:
    """The autotune bucket of a size: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(1, size)))


def width_class(width: int) -> int:
    """The feature-width class of a call (see :data:`WIDTH_CLASSES`)."""
    return min(WIDTH_CLASSES[-1], max(WIDTH_CLASSES[0], triton.next_power_of_2(max(1, width))))


def family_width(family: str, d: int, c: int) -> int:
    """The feature width a kernel family's tiles must cover: C for the forward, max(D, C) for the backward."""
    return c if family == "forward" else max(d, c)


def even_heuristics():
    """Tail-tile heuristics: a feature dimension that the tile divides needs no mask."""
    return {
        "EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0,
        "EVEN_C": lambda args: args["C"] % args["BLOCK_C"] == 0,
    }


def configs_for(family: str, fp32: bool, symmetric: bool = True, width: int = 64) -> list:
    """The autotune list of a kernel family (forward, column, row, preprocess) for feature ``width``
    (any size; its class is taken); the first is the default.

    ``fp32``: float32 (or float64) inputs, whose tf32x3 products need smaller tiles than half inputs.
    ``symmetric``: the variant's ``symmetric`` flag (half column passes without it default to 4 warps).
    """
    if family == "preprocess":
        return PREPROCESS_CONFIGS
    key = (family, fp32) if family == "forward" else (family, fp32, symmetric)
    return _WIDE[key][width_class(width)]


def shipped_lists(families=("forward", "column", "row")) -> list[list]:
    """Every autotune list :func:`configs_for` can return for ``families`` (each list once, in a fixed order):
    over both input kinds, the ``symmetric`` flag and the width classes."""
    lists = {id(lst): lst for family in families for fp32 in (False, True) for symmetric in (False, True)
             for width in WIDTH_CLASSES for lst in [configs_for(family, fp32, symmetric, width)]}
    return list(lists.values())


def interpreter_blocks(config) -> dict:
    """The tiles the interpreter runs a kernel with: :data:`INTERPRETER_BLOCKS`, with the feature tiles
    of ``config`` (the default of the call's list)."""
    blocks = {name: INTERPRETER_BLOCKS[name] for name in config.kwargs if name in INTERPRETER_BLOCKS}
    if "SPLIT_K" in config.kwargs:  # the pair tiles split as on a GPU (chunks of BLOCK_D / SPLIT_K columns)
        blocks["SPLIT_K"] = config.kwargs["SPLIT_K"]
    if "OUT_D" in config.kwargs:  # backward: output feature tiles of the class, sliced as on a GPU
        blocks.update(OUT_D=config.kwargs["OUT_D"], OUT_C=config.kwargs["OUT_C"], SLICE=config.kwargs["SLICE"])
    elif "BLOCK_I" in config.kwargs and "BLOCK_J" in config.kwargs:  # forward: the value tile of the class
        blocks["BLOCK_C"] = config.kwargs["BLOCK_C"]
    return blocks


_BY_TARGET = {}


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
