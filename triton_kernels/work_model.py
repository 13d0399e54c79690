"""Static work model of the fused kernels, and predicted H100 times of the fused, dense and SDPA paths.

For one call shape (:class:`Call`: B, N, M, D, C, kernel, normalize, update, symmetric, dtype) and the
tiles the launcher would choose (the default of the width class's list in :mod:`.configs`, or the
interpreter's tiles), :func:`fused_work` follows the loop structure of :mod:`.aggregate` and counts

* ``dot_flops``: 2·m·n·k summed over every ``tl.dot`` the kernels execute, padding of tail tiles
  included: exactly what the interpreter executes (tests/triton_suite.py counts it by wrapping
  ``InterpreterBuilder.create_dot``); distance kernels with D ≤ 3 form ρ from direct differences
  (no pair GEMM, vector work not counted);
* ``issued_flops``: the same work as the warps issue it on sm_90. Where a product's output has fewer
  16 × 8 tensor-core instruction tiles than the program has warps along one side, Triton's layout makes
  several warps compute the same tile: the 16 × 16 pair tiles of class 64's backward column passes are
  computed 2 to 8 times, the forward's float32 tiles 2 to
  8 times (the other wide backward passes split their pair tiles over the warps). The copies per
  product (``tile``: the pair tiles q kᵀ and G vᵀ; ``value``: the products into the accumulators) are
  measured from the compiled layouts and kept beside each configuration (:func:`.configs.replication_of`,
  checked against the AOT report by tests/test_aot.py); ``tensor_flops`` is the issued work as the
  tensor cores see it (float32 inputs use tf32x3: three tf32 products per dot);
* ``needed_flops``: the work of the computation itself, 2·B·N·M·(p·D + C) forward and
  2·B·N·M·(3p·D + 2C) backward (p = 2 with ``symmetric``: S and S′, dk and dq′, dq and dk′), plus for
  ``sym`` the one pair product that the column sums force before the value product can start
  (forward: the column-sum pass; backward: the pass that finds T_j = Σ_i dâ_ij â_ij, which every H_ij
  needs) — 2·B·N·M·p·D each; ``ratio`` = dot_flops / needed_flops (the recomputation the issue bounds),
  ``issued_ratio`` = issued_flops / needed_flops (what the time prediction uses);
* ``loaded_bytes``: every tile load of the loops (served from L2 mostly) and ``hbm_bytes``: each input
  read and each output written once, when one batch element's operands fit in L2, else the loaded bytes.

:func:`predict` turns work into an H100 SXM time (990 TFLOP/s dense fp16/bf16 tensor cores, 495
tf32, 67 fp32 without tensor cores, 3.35 TB/s HBM3, an assumed 5.5 TB/s L2) as a roofline
max(FLOPs / (peak·efficiency), bytes / bandwidth) with the efficiencies of :data:`EFFICIENCY` — assumed,
not measured (no GPU was available): they are what a GPU owner should calibrate. :func:`dense_work`
models ``backend="reference"`` on CUDA (two GEMMs in the compute dtype — float32 for half inputs,
without TF32, PyTorch's default — plus its passes over the B·N·M matrices) and :func:`sdpa_work`
``torch.nn.functional.scaled_dot_product_attention`` where it expresses the call (gaussian + row, not
symmetric, half inputs, D = C ≤ 256: the flash kernel's limits).
"""

from __future__ import annotations

from dataclasses import dataclass

from nonlocal_ext.kernels import KERNELS, uses_direct_differences

from .configs import configs_for, family_width, interpreter_blocks, replication_of

#: H100 SXM peaks (dense).
PEAK_TENSOR = {"fp16": 990e12, "bf16": 990e12, "tf32": 495e12}
PEAK_FP32 = 67e12
HBM_BYTES_PER_S = 3.35e12
L2_BYTES_PER_S = 5.5e12   # assumption: measured L2 read bandwidths of H100 are quoted at 5.5–7 TB/s
L2_BYTES = 50 * 2**20
#: Assumed cost of one kernel launch with PyTorch's host overhead (what small calls are made of).
LAUNCH_SECONDS = 5e-6

#: Fraction of peak each path is assumed to reach (a GPU owner should calibrate these).
#: fused: Triton at one pipeline stage and small tiles (bench/NOTES_triton.md predicted 1.3–2× of flash);
#: dense: cuBLAS GEMMs; sdpa: FlashAttention-2 forward / backward on H100 (35–60 % of peak quoted).
EFFICIENCY = {"fused": 0.35, "dense_gemm": 0.7, "sdpa_forward": 0.5, "sdpa_backward": 0.35}

#: Passes over a B·N·M float32 matrix the dense reference makes (each pass = one read or one write),
#: counted from backends/reference.py and kernels.pair_variable: forward and forward + backward.
DENSE_PASSES = {
    ("dot", "forward"): 6, ("dot", "backward"): 14,
    ("distance", "forward"): 16, ("distance", "backward"): 36,
}
#: N×M float32 buffers alive at once in the dense path (autograd keeps the intermediates of the
#: forward for the backward; the forward alone keeps about three).
DENSE_LIVE_BUFFERS = {("dot", "forward"): 3, ("dot", "backward"): 6,
                      ("distance", "forward"): 4, ("distance", "backward"): 10}


@dataclass(frozen=True)
class Call:
    batch: int
    n: int
    m: int
    d: int
    c: int
    kernel: str = "gaussian"
    normalize: str = "row"
    update: str = "aggregate"
    symmetric: bool = False
    dtype: str = "fp16"  # fp16, bf16, fp32

    @property
    def fp32(self) -> bool:
        return self.dtype == "fp32"

    @property
    def element_bytes(self) -> int:
        return 4 if self.fp32 else 2

    @property
    def pairs(self) -> int:
        return 2 if self.symmetric else 1

    @property
    def is_distance(self) -> bool:
        return KERNELS[self.kernel].family == "distance"


def blocks_for(family: str, call: Call, interpreted: bool = False, swapped: bool = False) -> dict:
    """The tiles the launcher runs ``family`` (forward, column, row) with for ``call``.

    ``swapped``: the column-sum pass of ``sym`` (the forward kernel without values)."""
    width = 0 if swapped else family_width(family, call.d, call.c)
    config = configs_for(family, call.fp32, call.symmetric, width)[0]
    if interpreted:
        return interpreter_blocks(config)
    return dict(config.kwargs, replication=replication_of("forward" if swapped else family, config))


def _cdiv(a, b):
    return -(-a // b)


def _forward_program(blk, cols, d, c, pairs, with_values, pair_d):
    """(tile dot FLOPs, value dot FLOPs, loaded elements) of one forward program over ``cols`` keys;
    ``pair_d``: the features of the pair GEMM (0 where ρ comes from direct differences)."""
    bi, bj, bd, bc = blk["BLOCK_I"], blk["BLOCK_J"], blk["BLOCK_D"], blk["BLOCK_C"]
    steps = _cdiv(cols, bj)
    tile = steps * pairs * _cdiv(pair_d, bd) * 2 * bi * bj * bd
    value = 0
    loads = steps * pairs * _cdiv(d, bd) * (bi + bj) * bd
    if with_values:
        value = steps * 2 * bi * bj * bc
        loads += steps * bj * bc
    return tile, value, loads


def _backward_program(blk, inner, d, c, pairs, with_dv, with_dk, column, pair_d):
    """(tile dot FLOPs, value dot FLOPs, loaded elements) of one column (row) program over ``inner`` rows
    (columns)."""
    bi, bj, bd, bc, out = blk["BLOCK_I"], blk["BLOCK_J"], blk["BLOCK_D"], blk["BLOCK_C"], blk["OUT_D"]
    step = bi if column else bj
    steps = _cdiv(inner, step)
    tile = pairs * _cdiv(pair_d, bd) * 2 * bi * bj * bd
    loads = pairs * _cdiv(d, bd) * (bi + bj) * bd
    if with_dk or not column:  # dâ = G vᵀ (the first `sym` column pass, dv only, does without)
        tile += _cdiv(c, bc) * 2 * bi * bj * bc
        loads += _cdiv(c, bc) * (bi + bj) * bc
    value = 0
    if column:
        if with_dv:
            value += 2 * bj * bi * out
            loads += bi * out
        if with_dk:
            value += pairs * 2 * bj * bi * out
            loads += pairs * bi * out
    else:
        value += pairs * 2 * bi * bj * out
        loads += pairs * bj * out
    return steps * tile, steps * value, steps * loads


def fused_work(call: Call, pass_: str = "forward", interpreted: bool = False, blocks=None) -> dict:
    """Executed and needed work of the fused kernels for one call (see the module docstring).

    ``blocks``: override the tiles (``{family: blocks}``), e.g. to model an older tiling."""
    b, n, m, d, c, p = call.batch, call.n, call.m, call.d, call.c, call.pairs
    sym = call.normalize == "sym"
    blk = dict(blocks) if blocks else {}
    for family in ("forward", "column", "row"):
        blk.setdefault(family, blocks_for(family, call, interpreted))
    blk.setdefault("column_sums", blocks_for("forward", call, interpreted, swapped=True))
    pair_d = 0 if uses_direct_differences(KERNELS[call.kernel], d) else d
    flops = issued = loads = 0

    def add(family_blocks, programs, tile, value, loaded):
        nonlocal flops, issued, loads
        tile_copies, value_copies = family_blocks.get("replication", (1, 1))
        flops += b * programs * (tile + value)
        issued += b * programs * (tile * tile_copies + value * value_copies)
        loads += b * programs * loaded

    if pass_ == "forward":
        needed = 2 * b * n * m * (p * d + c)
        if sym:
            needed += 2 * b * n * m * p * d
            add(blk["column_sums"], _cdiv(m, blk["column_sums"]["BLOCK_I"]),
                *_forward_program(blk["column_sums"], n, d, c, p, False, pair_d))
        fb = blk["forward"]
        add(fb, _cdiv(n, fb["BLOCK_I"]) * _cdiv(c, fb["BLOCK_C"]), *_forward_program(fb, m, d, c, p, True, pair_d))
        unique = (n + m) * d + m * c + (n * c if call.update == "diffusion" else 0) + n * c
    else:
        needed = 2 * b * n * m * (3 * p * d + 2 * c) + (2 * b * n * m * p * d if sym else 0)
        cb, rb = blk["column"], blk["row"]
        features = lambda x: max(_cdiv(c, x["OUT_C"]), _cdiv(d, x["OUT_D"]), 1)  # noqa: E731
        for with_dv, with_dk in ([(True, False), (False, True)] if sym else [(True, True)]):
            add(cb, _cdiv(m, cb["BLOCK_J"]) * features(cb),
                *_backward_program(cb, n, d, c, p, with_dv, with_dk, column=True, pair_d=pair_d))
        add(rb, _cdiv(n, rb["BLOCK_I"]) * features(rb),
            *_backward_program(rb, m, d, c, p, False, False, column=False, pair_d=pair_d))
        unique = 2 * ((n + m) * d + m * c + n * c) + n * c  # inputs, G, out; gradients written
    per_batch_operands = ((n + m) * d + m * c + n * c) * call.element_bytes
    loaded_bytes = loads * call.element_bytes
    hbm_bytes = b * unique * call.element_bytes if per_batch_operands <= L2_BYTES else loaded_bytes
    tensor_flops = issued * (3 if call.fp32 else 1)
    return dict(dot_flops=flops, issued_flops=issued, tensor_flops=tensor_flops, needed_flops=needed,
                ratio=flops / needed, issued_ratio=issued / needed, loaded_bytes=loaded_bytes, hbm_bytes=hbm_bytes)


def _tensor_peak(call: Call) -> float:
    return PEAK_TENSOR["tf32"] if call.fp32 else PEAK_TENSOR[call.dtype]


def fused_launches(call: Call, pass_: str) -> int:
    """Kernel launches of the fused path: the Triton kernels plus the small torch ops around them
    (squared norms, statistics, casts, the symmetric and diffusion sums)."""
    sym = call.normalize == "sym"
    if pass_ == "forward":
        return 3 + (2 if call.is_distance else 0) + (2 if sym else 0)
    return 7 + (2 if call.is_distance else 0) + (1 if sym else 0) + (2 if call.symmetric else 0)


def predict_fused(call: Call, pass_: str = "forward") -> float:
    """Predicted seconds of the fused kernels (``pass_`` forward, or backward alone)."""
    w = fused_work(call, pass_)
    return LAUNCH_SECONDS * fused_launches(call, pass_) + max(
        w["tensor_flops"] / (_tensor_peak(call) * EFFICIENCY["fused"]),
        w["hbm_bytes"] / HBM_BYTES_PER_S, w["loaded_bytes"] / L2_BYTES_PER_S)


def dense_work(call: Call, pass_: str = "forward") -> dict:
    """Work and memory of ``backend="reference"`` on CUDA: GEMMs in float32 (half inputs are upcast;
    PyTorch's default ``allow_tf32=False`` keeps them off the tensor cores) plus B·N·M passes."""
    b, n, m, d, c, p = call.batch, call.n, call.m, call.d, call.c, call.pairs
    family = "distance" if call.is_distance else "dot"
    gemm = 2 * b * n * m * (d + c)  # S = q kᵀ (the symmetric term is a transpose of it), Â v
    if pass_ == "backward":
        gemm = 2 * b * n * m * (2 * d + 2 * c)  # dâ = G vᵀ, dv = Âᵀ G, dq = C k, dk = Cᵀ q
    matrix = b * n * m * 4
    passes = DENSE_PASSES[(family, pass_)] + (2 if call.symmetric else 0) + (2 if call.normalize == "sym" else 0)
    if pass_ == "backward":
        passes -= DENSE_PASSES[(family, "forward")]  # the backward's own passes
    live = DENSE_LIVE_BUFFERS[(family, pass_)] + (1 if call.symmetric else 0)
    # about one launch per read-write pair of passes, plus the GEMMs
    launches = passes // 2 + (2 if pass_ == "forward" else 4)
    return dict(gemm_flops=gemm, matrix_bytes=passes * matrix, peak_bytes=live * matrix, launches=launches)


def predict_dense(call: Call, pass_: str = "forward") -> float:
    w = dense_work(call, pass_)
    return (LAUNCH_SECONDS * w["launches"] + w["gemm_flops"] / (PEAK_FP32 * EFFICIENCY["dense_gemm"])
            + w["matrix_bytes"] / HBM_BYTES_PER_S)


def sdpa_applies(call: Call) -> bool:
    """Whether ``scaled_dot_product_attention`` computes this call (its flash kernel, predicted)."""
    return (call.kernel == "gaussian" and call.normalize == "row" and not call.symmetric
            and call.dtype in ("fp16", "bf16") and call.d == call.c and call.d <= 256 and call.d % 8 == 0)


def predict_sdpa(call: Call, pass_: str = "forward") -> float | None:
    """Predicted seconds of SDPA's flash kernel; None where it does not apply."""
    if not sdpa_applies(call):
        return None
    b, n, m, d, c = call.batch, call.n, call.m, call.d, call.c
    if pass_ == "forward":
        return LAUNCH_SECONDS + 2 * b * n * m * (d + c) / (PEAK_TENSOR[call.dtype] * EFFICIENCY["sdpa_forward"])
    # FlashAttention-2's backward recomputes S = q kᵀ and forms dP = dO vᵀ, dv, dq and dk: 2·N·M·(3D + 2C)
    flops = 2 * b * n * m * (3 * d + 2 * c)
    return 3 * LAUNCH_SECONDS + flops / (PEAK_TENSOR[call.dtype] * EFFICIENCY["sdpa_backward"])


def predictions(call: Call, training: bool = True) -> dict:
    """Predicted seconds of each path for a forward (``training``: forward + backward) call; None: n/a."""
    passes = ("forward", "backward") if training else ("forward",)
    out = {"fused": sum(predict_fused(call, p) for p in passes),
           "dense": sum(predict_dense(call, p) for p in passes)}
    sdpa = [predict_sdpa(call, p) for p in passes]
    out["sdpa"] = None if None in sdpa else sum(sdpa)
    return out


def dense_bytes(call: Call, training: bool = True) -> int:
    """Peak bytes of the dense path's B·N·M buffers."""
    return dense_work(call, "backward" if training else "forward")["peak_bytes"]


#: The nonlocal-block shapes (B, N, M, D = C) of bench/NOTES.md's CPU suite, plus D = C = 1024.
SUITE = {
    "res4": (16, 196, 49, 512),
    "res3": (8, 784, 196, 256),
    "detection": (2, 3400, 850, 512),
    "i3d": (4, 784, 196, 512),
    "segmentation": (2, 4096, 4096, 128),
    "i3d-1024": (4, 784, 196, 1024),
}


def suite_calls(kernel="gaussian", normalize="row", dtype="fp16"):
    return {name: Call(b, n, m, dc, dc, kernel, normalize, "aggregate", False, dtype)
            for name, (b, n, m, dc) in SUITE.items()}

