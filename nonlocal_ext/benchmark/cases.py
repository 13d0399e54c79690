"""One benchmark case, its inputs, and the work it represents.

A case is one call of ``nonlocal_aggregate`` (kernel, normalize, update, sizes, dtype, device)
measured in one *pass*:

* ``fwd``     — the forward alone, inputs not requiring grad (inference);
* ``bwd``     — the backward alone: the forward is run once outside the timer, then each timed
  step is ``torch.autograd.grad(out, inputs, G, retain_graph=True)``;
* ``fwd+bwd`` — forward then backward, as in a training step.

**FLOPs** count the dense GEMM work: the forward does ``S = q kᵀ`` and ``Â v``, i.e.
``2·N·M·(D+C)`` per batch element. The backward does four GEMMs of the same sizes
(``dv = ÂᵀG``, ``dÂ = G vᵀ``, ``dq = C k``, ``dk = Cᵀ q``): ``2×`` the forward; ``fwd+bwd``
counts ``3×``. The elementwise kernel work and the recomputation of W that a memory-efficient
backward does are not counted, so GFLOP/s compares backends on the same useful work. A runner
that does less work exactly (the low-rank ``linear`` path of ``dot``) declares its own count.

**Bytes** count the compulsory traffic: every input read once, every output written once
(forward: q, k, v [, u] in, out; backward: q, k, v [, u] and G in, their gradients out).
FLOPs / bytes is the arithmetic intensity a roofline needs.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

from nonlocal_ext.kernels import KERNELS, resolve_params
from nonlocal_ext.testing import KERNEL_PARAMS, make_inputs

PASSES = ("fwd", "bwd", "fwd+bwd")

#: GEMM-work multiple of each pass relative to the forward (see the module docstring).
PASS_FLOP_FACTOR = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}

#: The op's kernel parameters that ``nonlocal-bench`` can set (``--scale`` ...), in JSON row order.
PARAMETERS = ("scale", "power", "gamma", "eps")


def uses_parameter(kernel: str, name: str) -> bool:
    """Whether ``kernel`` takes the parameter ``name`` (the op refuses ``power``/``gamma`` elsewhere;
    ``eps`` only matters to the kernels with coincident pairs)."""
    affinity = KERNELS[kernel]
    return {"scale": True, "power": affinity.uses_power, "gamma": affinity.uses_gamma,
            "eps": affinity.masks_coincident}[name]


DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One call, measured in one pass. Sizes follow the op: query (B, N, D), key (B, M, D), value (B, M, C)."""

    kernel: str
    normalize: str
    update: str
    N: int
    M: int
    D: int
    C: int
    batch: int
    dtype: str
    device: str
    pass_: str
    #: (name, value) pairs of kernel parameters set on the command line, over
    #: :data:`nonlocal_ext.testing.KERNEL_PARAMS`
    params: tuple = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kernel_kwargs(self) -> dict:
        """The kernel parameters passed to the op: :data:`~nonlocal_ext.testing.KERNEL_PARAMS`, then the
        command line's."""
        return {**KERNEL_PARAMS[self.kernel], **dict(self.params)}

    def parameters(self) -> dict:
        """Every parameter of :data:`PARAMETERS` as the op uses it (defaults resolved, ``eps`` per dtype);
        None for those this kernel does not take."""
        kw = self.kernel_kwargs
        p = resolve_params(KERNELS[self.kernel], self.torch_dtype, scale=kw.get("scale", 1.0),
                           power=kw.get("power"), gamma=kw.get("gamma"), eps=kw.get("eps"))
        return {name: getattr(p, name) if uses_parameter(self.kernel, name) else None for name in PARAMETERS}

    def inputs(self, seed: int = 0) -> tuple:
        """(query, key, value, self_value or None) for the case, on its device and in its dtype:
        :func:`nonlocal_ext.testing.make_inputs` drawn in float32, without coincident pairs."""
        return tuple(make_inputs(self.kernel, self.normalize, (self.batch,), self.N, self.M, self.D, self.C,
                                 with_self_value=self.explicit_self_value, dtype=self.torch_dtype,
                                 device=self.device, seed=seed, coincident=False, draw_dtype=torch.float32))

    @property
    def needs_backward(self) -> bool:
        return self.pass_ != "fwd"

    @property
    def explicit_self_value(self) -> bool:
        """Diffusion with N ≠ M needs u = self_value; with N = M the op uses u = value."""
        return self.update == "diffusion" and self.N != self.M

    def forward_flops(self) -> float:
        return 2.0 * self.batch * self.N * self.M * (self.D + self.C)

    def flops(self, forward_flops: float | None = None) -> float:
        """GEMM FLOPs of this pass; ``forward_flops`` overrides the dense forward count."""
        fwd = self.forward_flops() if forward_flops is None else forward_flops
        return fwd * PASS_FLOP_FACTOR[self.pass_]

    def bytes(self) -> float:
        """Compulsory memory traffic of this pass, in bytes."""
        n, m, d, c = self.N, self.M, self.D, self.C
        inputs = n * d + m * d + m * c + (n * c if self.explicit_self_value else 0)
        forward = inputs + n * c  # inputs in, out
        backward = inputs + n * c + inputs  # inputs and G in, one gradient per input out
        traffic = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[self.pass_]
        return float(traffic * self.batch * torch.empty((), dtype=self.torch_dtype).element_size())

    def describe(self) -> dict:
        """The case's fields under the JSON row names (``pass`` rather than ``pass_``), then the
        kernel parameters used (:meth:`parameters`)."""
        row = asdict(self)
        row["pass"] = row.pop("pass_")
        del row["params"]
        return {**row, **self.parameters()}

    def label(self) -> str:
        return (f"{self.kernel}+{self.normalize}" + ("" if self.update == "aggregate" else f"+{self.update}")
                + f" N={self.N}" + ("" if self.M == self.N else f" M={self.M}") + f" {self.pass_}")


def sweep(kernels, normalizes, updates, ns, ms, ds, cs, batches, dtypes, device, passes, params=None) -> list[Case]:
    """Every combination, in the order the table prints it (N varies fastest but for the pass).

    ``ms`` empty means M = N. ``params``: kernel parameters by name, each given to the kernels that
    take it (:func:`uses_parameter`).
    """
    params = params or {}
    cases = []
    for kernel, normalize, update, dtype, d, c, batch, n in itertools.product(
            kernels, normalizes, updates, dtypes, ds, cs, batches, ns):
        for m in (ms or [n]):
            for pass_ in passes:
                own = tuple((k, v) for k, v in params.items() if uses_parameter(kernel, k))
                cases.append(Case(kernel, normalize, update, n, m, d, c, batch, dtype, device, pass_, own))
    return cases


#: Where nonlocal blocks run (name, batch, N, M, D = C): θ, φ, g have D = C = in_channels/2 and the
#: keys are max-pooled (M ≈ N/4) — ResNet-50 res4 and res3 (Wang et al., "Non-local Neural
#: Networks"), a detection res4 map (800×1088 input), I3D res4 (4×14×14) — plus segmentation without
#: pooling (64×64), the widest features (D = C = 1024) and unpooled keys (M = N).
BLOCK_SHAPES = (
    ("res4", 16, 196, 49, 512),
    ("res3", 8, 784, 196, 256),
    ("detection", 2, 3400, 850, 512),
    ("i3d", 4, 784, 196, 512),
    ("segmentation", 2, 4096, 4096, 128),
    ("wide", 2, 784, 196, 1024),
    ("unpooled", 8, 784, 784, 256),
)

#: The (kernel, normalize) pairs of the block suite; the last dtype list is for the first pair only.
BLOCK_KERNELS = (("gaussian", "row"), ("dot", "count"), ("fractional", "count"), ("fractional", "row"), ("rbf", "row"))


def block_suite(dtypes, device, passes) -> list[Case]:
    """The nonlocal-block cases: every shape of :data:`BLOCK_SHAPES` for every pair of
    :data:`BLOCK_KERNELS` in float32, and ``gaussian`` + ``row`` in the other ``dtypes`` too."""
    cases = []
    for (kernel, normalize), dtype in itertools.product(BLOCK_KERNELS, dtypes):
        if dtype != "float32" and (kernel, normalize) != BLOCK_KERNELS[0]:
            continue
        for _, batch, n, m, dc in BLOCK_SHAPES:
            for pass_ in passes:
                cases.append(Case(kernel, normalize, "aggregate", n, m, dc, dc, batch, dtype, device, pass_))
    return cases
