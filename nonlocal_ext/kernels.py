"""The affinity kernels: one definition each, enumerated by every backend and every test.

An affinity kernel ``f(q, k)`` is a function of one *pair variable* ``x``:

* the ``dot`` family uses ``x = q·k`` (one GEMM per tile);
* the ``distance`` family uses ``x = ρ = ‖q−k‖² = ‖q‖² + ‖k‖² − 2 q·k``, computed from
  the same GEMM plus row and column norms, clamped at 0 — or, for few features, from direct
  differences (:data:`DIRECT_DIFFERENCES_MAX_FEATURES`).

=============  ========  ====================================  ==============================
kernel         family    f(x)                                  f′(x) = df/dx
=============  ========  ====================================  ==============================
``dot``        dot       scale·x                               scale
``gaussian``   dot       exp(scale·x)                          scale·f
``rbf``        distance  exp(−scale·ρ)                         −scale·f
``fractional`` distance  scale·ρ^(−power/2)                    −(power/2)·f/ρ
``log``        distance  −scale·log ρ − gamma                  −scale/ρ
=============  ========  ====================================  ==============================

(``log`` is ``−2·scale·log‖q−k‖ − gamma``.) ``fractional`` and ``log`` are singular at ρ = 0:
a *coincident* pair, ``ρ ≤ eps·(‖q̄‖² + ‖k̄‖²)``, gets weight 0 and contributes no gradient
(the "safe divide" of the PIDE thesis). ``eps=None`` resolves to :func:`default_eps`.

**Translation.** q̄ = q − μ and k̄ = k − μ, with μ the mean of the finite entries of the keys, one
point per batch element (:func:`common_translation`, :func:`prepared_points`). The op applies this shift to the inputs of
every distance kernel before any backend runs, so every backend computes ρ and the coincident-pair
rule from q̄ and k̄: moving all points by one vector changes nothing (up to rounding of the
inputs themselves), and ρ = ‖q̄‖² + ‖k̄‖² − 2 q̄·k̄ does not cancel away the digits of coordinates
far from the origin. μ is a constant for autograd: the kernels are translation invariant, so its
derivative contributes nothing. Non-finite key entries are left out of the mean, so a NaN or Inf
reaches only what depends on it.

**Non-finite inputs.** A query or key row with a NaN or Inf entry is made all-NaN by the op
(:func:`prepared_points`), for every kernel: its affinities are NaN, and so is every output and
gradient that depends on them, on every backend; rows that do not depend on it stay finite.

``gaussian`` is *log-domain*: backends handle ``log f = scale·x`` so that row and
symmetric normalizations are computed with log-sum-exp and never overflow.

Parameters are checked per kernel (:func:`resolve_params`): ``power`` belongs to ``fractional``
and ``gamma`` to ``log`` only (passing either to another kernel is an error, not ignored);
``rbf`` and ``log`` need ``scale > 0``, since a negative scale makes their weight grow without
bound with the distance (``exp(|scale|·ρ)`` overflows; ``|scale|·log ρ`` grows instead of
decaying). ``dot``, ``log`` and ``fractional`` with ``scale < 0`` can give negative weights
(:meth:`AffinityKernel.weight_sign`), hence negative row or column sums, for which the
``sym`` normalization ``r^(−½)`` is undefined (see :func:`nonlocal_ext.nonlocal_aggregate`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = [
    "AffinityKernel",
    "KERNELS",
    "KernelParams",
    "common_translation",
    "EULER_GAMMA",
    "default_eps",
    "in_log_domain",
    "certainly_finite",
    "nonfinite_rows",
    "prepared_points",
    "pair_variable",
    "pair_gradients",
    "squared_distances",
    "uses_direct_differences",
]

# Large enough that q = k yields exactly weight 0 when ρ is formed as ‖q‖² + ‖k‖² − 2 q·k:
# with q = k every product is non-negative, so the three sums agree to (D−1)·u relative
# error (u the unit roundoff), i.e. ≤ 6e-5 in float32 and ≤ 1.2e-13 in float64 for D ≤ 1024.
# float16/bfloat16 inputs are accumulated in float32, hence share its threshold.
_DEFAULT_EPS = {
    torch.float64: 1e-12,
    torch.float32: 1e-4,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-4,
}


#: The default ``gamma`` of ``log``: the Euler–Mascheroni constant of the log kernel of the
#: inverse fractional Laplacian at s = n/2.
EULER_GAMMA = 0.5772156649015329


def default_eps(dtype: torch.dtype) -> float:
    """The coincident-pair threshold used when ``eps=None``, per input dtype."""
    return _DEFAULT_EPS[dtype]


@dataclass(frozen=True)
class KernelParams:
    """Validated scalar parameters of an affinity kernel (``eps`` already resolved).

    ``gamma`` is used by ``log`` only; the other kernels carry the default, unused.
    """

    scale: float = 1.0
    power: float | None = None
    gamma: float = EULER_GAMMA
    eps: float = 0.0


class AffinityKernel:
    """One affinity kernel: its pair variable, formula and derivative.

    Subclasses set the class attributes and implement :meth:`weight` and :meth:`derivative`
    (and :meth:`log_weight` for log-domain kernels). The functions take the pair variable
    ``x`` (a tensor) and return tensors of the same shape; they never see coincident pairs,
    which callers mask out (see :func:`pair_variable`).
    """

    name: str
    family: str  # "dot": x = q·k ; "distance": x = ‖q−k‖²
    uses_power: bool = False
    uses_gamma: bool = False
    masks_coincident: bool = False
    log_domain: bool = False
    #: why ``scale <= 0`` is refused, for kernels whose weight then grows without bound with distance
    positive_scale_reason: str | None = None
    #: for kernels with ``weight_sign() == "any"`` (error messages): where the weights are negative,
    #: and how to keep the row and column sums non-negative
    negative_where: str | None = None
    nonnegative_sums_by: str | None = None

    def weight_sign(self, p: KernelParams) -> str:
        """``"nonnegative"``, ``"nonpositive"`` or ``"any"``: the signs the weights can take with these
        parameters, whatever the inputs. Row and column sums can be negative unless ``"nonnegative"``."""
        return "nonnegative"

    def weight(self, x: torch.Tensor, p: KernelParams) -> torch.Tensor:
        raise NotImplementedError

    def derivative(self, x: torch.Tensor, w: torch.Tensor, p: KernelParams) -> torch.Tensor:
        """df/dx, given ``w = f(x)``."""
        raise NotImplementedError

    def log_weight(self, x: torch.Tensor, p: KernelParams) -> torch.Tensor:
        """log f(x), for log-domain kernels."""
        raise TypeError(f"kernel {self.name!r} is not log-domain")

    def log_derivative(self, p: KernelParams) -> float:
        """d log f / dx, a constant for the log-domain kernels we have."""
        raise TypeError(f"kernel {self.name!r} is not log-domain")

    def __repr__(self) -> str:
        return f"<affinity kernel {self.name!r}>"


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·x, without a pass over x (and a node in the autograd graph) when the scale is 1."""
    return x if scale == 1.0 else scale * x


class Dot(AffinityKernel):
    name, family = "dot", "dot"
    negative_where = "for pairs with scale·q·k < 0"
    nonnegative_sums_by = ("non-negative query and key (e.g. ReLU embeddings, as in the spectral nonlocal "
                           "authors' code) with scale > 0")

    def weight_sign(self, p):
        return "any"

    def weight(self, x, p):
        return _scaled(x, p.scale)

    def derivative(self, x, w, p):
        return torch.full_like(x, p.scale)


class Gaussian(AffinityKernel):
    name, family, log_domain = "gaussian", "dot", True

    def log_weight(self, x, p):
        return _scaled(x, p.scale)

    def log_derivative(self, p):
        return p.scale

    def weight(self, x, p):
        return torch.exp(_scaled(x, p.scale))

    def derivative(self, x, w, p):
        return p.scale * w


class RBF(AffinityKernel):
    name, family = "rbf", "distance"
    positive_scale_reason = "exp(−scale·ρ) grows without bound with the distance ρ unless scale > 0"

    def weight(self, x, p):
        return torch.exp(-p.scale * x)

    def derivative(self, x, w, p):
        return -p.scale * w


class Fractional(AffinityKernel):
    name, family, uses_power, masks_coincident = "fractional", "distance", True, True

    def weight_sign(self, p):
        return "nonpositive" if p.scale < 0 else "nonnegative"

    def weight(self, x, p):
        return p.scale * x.pow(-0.5 * p.power)

    def derivative(self, x, w, p):
        return (-0.5 * p.power) * w / x


class Log(AffinityKernel):
    name, family, uses_gamma, masks_coincident = "log", "distance", True, True
    positive_scale_reason = ("−scale·log ρ − gamma grows without bound with the distance ρ unless scale > 0 "
                             "(it must decay, as the log kernel of the inverse fractional Laplacian does)")
    negative_where = "for pairs farther apart than ρ = ‖q−k‖² > exp(−gamma/scale)"
    nonnegative_sums_by = "a lower gamma (gamma = −g keeps every weight positive up to ρ = exp(g/scale))"

    def weight_sign(self, p):
        return "any"  # negative for ρ > exp(−gamma/scale), whatever the parameters

    def weight(self, x, p):
        return -p.scale * torch.log(x) - p.gamma

    def derivative(self, x, w, p):
        return -p.scale / x


KERNELS: dict[str, AffinityKernel] = {k.name: k for k in (Dot(), Gaussian(), RBF(), Fractional(), Log())}


def in_log_domain(kernel: AffinityKernel, normalize: str) -> bool:
    """Whether the PyTorch backends handle this call's weights as log f.

    Log-domain kernels are, under the normalizations that divide by sums (``row``, ``sym``): there
    log-sum-exp keeps the sums from overflowing. Under ``none`` and ``count`` the weights are the
    result itself, and ``symmetric`` forms ½(w + w′) directly: its derivative in w does not involve
    w′, whereas that of log ½(e^L + e^L′) does (so a NaN in w′ would reach gradients that do not
    depend on it).
    """
    return kernel.log_domain and normalize in ("row", "sym")


#: Distance kernels on at most this many features form ρ from direct differences Σ_d (a_d − b_d)²
#: (:func:`squared_distances`) instead of ‖a‖² + ‖b‖² − 2 a·b, and send gradients back the same
#: way. The GEMM form loses about u·(‖a‖² + ‖b‖²)/ρ of ρ's relative accuracy (u the unit
#: roundoff), which for coordinates (D = 2, 3) with close pairs is more than the kernels
#: tolerate (``fractional`` with power 4: ρ^−2); direct differences cost about what the GEMM form
#: does up to this D (bench/NOTES_numerics.md).
DIRECT_DIFFERENCES_MAX_FEATURES = 3


def uses_direct_differences(kernel: AffinityKernel, features: int) -> bool:
    """Whether :func:`pair_variable` and :func:`pair_gradients` take the direct-difference form."""
    return kernel.family == "distance" and features <= DIRECT_DIFFERENCES_MAX_FEATURES


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ρ_ij = Σ_d (a_id − b_jd)², one feature at a time (no ``(..., I, J, D)`` temporary).

    """
    if a.shape[-1] == 0:
        return a.new_zeros(a.shape[:-2] + (a.shape[-2], b.shape[-2]))
    rho = None
    for d in range(a.shape[-1]):
        diff = a[..., d].unsqueeze(-1) - b[..., d].unsqueeze(-2)
        rho = diff * diff if rho is None else rho + diff * diff
    return rho


def pair_variable(kernel: AffinityKernel, a: torch.Tensor, b: torch.Tensor, a_sqnorm=None, b_sqnorm=None,
                  eps: float = 0.0):
    """The pair variable ``x_ij`` between rows of ``a (..., I, D)`` and ``b (..., J, D)``.

    Returns ``(x, coincident)``: ``x`` of shape ``(..., I, J)`` and a boolean mask of the
    coincident pairs, ``ρ ≤ eps·(‖a‖² + ‖b‖²)`` (``None`` when the kernel has none). For distance
    kernels the squared norms may be passed in to avoid recomputing them per tile; ``a`` and ``b``
    are the translated inputs (see the module docstring), so the rule does not depend on the
    origin. ρ comes from direct differences up to DIRECT_DIFFERENCES_MAX_FEATURES features, else
    from one GEMM. Coincident entries of ``x`` are replaced by 1 so that the kernel formulas stay
    finite there (and so do their autograd derivatives); callers zero those weights with the mask.
    """
    if kernel.family == "dot":
        return a @ b.transpose(-1, -2), None
    an = a.square().sum(-1) if a_sqnorm is None else a_sqnorm
    bn = b.square().sum(-1) if b_sqnorm is None else b_sqnorm
    norms = an.unsqueeze(-1) + bn.unsqueeze(-2)
    if uses_direct_differences(kernel, a.shape[-1]):
        rho = squared_distances(a, b)
    else:
        rho = norms - 2.0 * (a @ b.transpose(-1, -2))
        # Rounding can leave ρ slightly below 0. Not clamp_min: its backward drops the gradient where
        # ρ is NaN, which would hide a NaN input from the gradients that depend on it.
        rho = torch.where(rho < 0, torch.zeros_like(rho), rho)
    if not kernel.masks_coincident:
        return rho, None
    coincident = rho <= eps * norms
    return torch.where(coincident, torch.ones_like(rho), rho), coincident


def values_readable(t: torch.Tensor) -> bool:
    """Whether ``t`` holds values this process can read now: not meta, fake, traced, inside a
    ``torch.func`` transform (vmap cannot branch on data) or being captured into a CUDA graph."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor or t.device.type == "meta":
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def certainly_finite(t: torch.Tensor) -> bool:
    """True only if every entry of ``t`` is finite, screened by one sum (a finite sum needs finite
    terms; an overflowing sum of finite terms only sends the caller down its general path). CPU
    tensors with readable values only: elsewhere it would cost a device sync or break a traced
    graph, and returns False."""
    if t.device.type != "cpu" or not values_readable(t) or t.numel() == 0:
        return t.numel() == 0
    return math.isfinite(t.detach().sum().item())  # .item(): a fraction of isfinite + bool's dispatch cost


def nonfinite_rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., R, 1)``, detached: 0 for a row of ``t`` whose entries are all finite, NaN otherwise."""
    finite = torch.isfinite(t.detach()).all(-1, keepdim=True)
    return torch.where(finite, torch.zeros((), dtype=t.dtype, device=t.device),
                       torch.full((), math.nan, dtype=t.dtype, device=t.device))


def common_translation(key: torch.Tensor, finite: bool = False) -> torch.Tensor:
    """μ ``(..., 1, D)``: the mean of the finite entries of ``key (..., M, D)`` per batch element and
    feature (0 where there is none), detached; distance kernels use ``q − μ`` and ``k − μ``.
    ``finite=True``: the caller knows every entry is finite (one pass instead of three).

    Summed in float32 at least (a float16 sum of many coordinates overflows).
    """
    k = key.detach()
    wide = torch.promote_types(k.dtype, torch.float32)
    if finite:
        return (k.sum(-2, keepdim=True, dtype=wide) / max(k.shape[-2], 1)).to(k.dtype)
    finite = torch.isfinite(k)
    total = torch.where(finite, k, torch.zeros((), dtype=k.dtype, device=k.device)).sum(-2, keepdim=True, dtype=wide)
    count = finite.sum(-2, keepdim=True).clamp_min(1)
    return (total / count).to(k.dtype)


def prepared_points(kernel: AffinityKernel, query: torch.Tensor, key: torch.Tensor, translate: bool = True):
    """The query and key rows every backend receives from the op.

    * A row with a NaN or Inf entry becomes all-NaN (:func:`nonfinite_rows`), for every kernel: every
      pair variable of the row is then NaN in every backend and every form of ρ (GEMM or direct
      differences), and so is everything that depends on it. (Left alone, an Inf coordinate gives
      pair variables ±Inf or NaN depending on the signs of the other row's entries, and weights
      exp(−Inf) = 0 that hide it.)
    * Distance kernels get both shifted by :func:`common_translation` of the keys, unless
      ``translate=False``: for a backend that applies the same translation itself (the C++ kernels
      shift the rows as they copy them, ``TRANSLATES_POINTS`` in :mod:`nonlocal_ext.backends.cpu`).

    Differentiable (identity) in both. Inputs that are all finite (checked by one sum on CPU) are
    returned unchanged for dot kernels and shifted in one pass for distance kernels.
    """
    q_finite, k_finite = certainly_finite(query), certainly_finite(key)
    if kernel.family == "distance" and translate:
        shift = common_translation(key, finite=k_finite)
        query = query - shift if q_finite else query - (shift - nonfinite_rows(query))
        key = key - shift if k_finite else key - (shift - nonfinite_rows(key))
        return query, key
    return (query if q_finite else query + nonfinite_rows(query),
            key if k_finite else key + nonfinite_rows(key))


def pair_gradients(kernel: AffinityKernel, grad_x: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """Back-propagate ``grad_x = ∂L/∂x (..., I, J)`` to the rows of ``a`` and ``b``.

    dot family, x = a_i·b_j:        da = C b,               db = Cᵀ a
    distance family, x = ‖a_i−b_j‖²: da = 2(a ⊙ C1 − C b),   db = 2(b ⊙ Cᵀ1 − Cᵀ a)
      or, with direct differences (see :func:`pair_variable`), feature by feature:
                                    da_d = 2 Σ_j C_ij (a_id − b_jd),   db_d = −2 Σ_i C_ij (a_id − b_jd)
    """
    if uses_direct_differences(kernel, a.shape[-1]):
        grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
        for d in range(a.shape[-1]):
            weighted = grad_x * (a[..., d].unsqueeze(-1) - b[..., d].unsqueeze(-2))
            grad_a[..., d] = 2.0 * weighted.sum(-1)
            grad_b[..., d] = -2.0 * weighted.sum(-2)
        return grad_a, grad_b
    grad_a = grad_x @ b
    grad_b = grad_x.transpose(-1, -2) @ a
    if kernel.family == "dot":
        return grad_a, grad_b
    grad_a = 2.0 * (a * grad_x.sum(-1, keepdim=True) - grad_a)
    grad_b = 2.0 * (b * grad_x.sum(-2).unsqueeze(-1) - grad_b)
    return grad_a, grad_b


def _is_real_number(value) -> bool:
    """Python and NumPy ints and floats; not bools, not tensors."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def type_name(value) -> str:
    """``float``, ``numpy.float32``, ``torch.Tensor``: for error messages."""
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


def _real(name, value) -> float:
    """``value`` as a float if it is a finite real number, else a TypeError/ValueError naming ``name``."""
    if not _is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type_name(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def resolve_params(kernel: AffinityKernel, dtype: torch.dtype, *, scale, power, gamma, eps) -> KernelParams:
    """Validate the scalar parameters for ``kernel`` and resolve ``gamma=None`` and ``eps=None``.

    ``power`` is for ``fractional`` (required there) and ``gamma`` for ``log`` only (``None``:
    :data:`EULER_GAMMA`); ``scale`` must be positive where a negative one would make the kernel
    grow without bound (``rbf``, ``log``).
    """
    scale = _real("scale", scale)
    if kernel.positive_scale_reason is not None and not scale > 0:
        raise ValueError(f"scale must be > 0 for kernel={kernel.name!r}, got {scale}: {kernel.positive_scale_reason}")
    if kernel.uses_power:
        if power is None:
            raise ValueError(f"kernel={kernel.name!r} needs power= (e.g. n + 2s for the fractional Laplacian)")
        power = _real("power", power)
    elif power is not None:
        raise ValueError(f"power is only used by kernel='fractional', not kernel={kernel.name!r}")
    if kernel.uses_gamma:
        gamma = EULER_GAMMA if gamma is None else _real("gamma", gamma)
    elif gamma is not None:
        raise ValueError(f"gamma is only used by kernel='log', not kernel={kernel.name!r}")
    else:
        gamma = EULER_GAMMA
    if eps is None:
        eps = default_eps(dtype)
    elif not _is_real_number(eps):
        raise TypeError(f"eps must be a real number or None, got {type_name(eps)}")
    elif not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return KernelParams(scale, power, gamma, float(eps))
