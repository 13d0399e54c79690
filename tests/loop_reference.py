"""A deliberately naive loop implementation of ``nonlocal_aggregate`` (the definitions of docs/semantics.md).

It shares no code with ``nonlocal_ext`` (only the constant ``EULER_GAMMA``): every number is a
Python float and every sum is an explicit loop, so it can be checked by reading. Only the tests use it.

For one batch element, with q (N×D), k (M×D), v (M×C) and u (N×C):

    x_ij   = q_i · k_j                         (dot, gaussian)
    rho_ij = Σ_d (q_id − k_jd)²                 (rbf, fractional, log; computed directly)

    f(q_i, k_j) = dot:         scale · x
                  gaussian:    exp(scale · x)
                  rbf:         exp(−scale · rho)
                  fractional:  scale · rho^(−power/2)
                  log:         −scale · log(rho) − gamma   (= −2·scale·log‖q−k‖ − gamma)

    fractional and log: w_ij = 0 where rho_ij <= eps · (‖q̄_i‖² + ‖k̄_j‖²)  (coincident pair),
    with q̄ = q − μ, k̄ = k − μ and μ the mean of the key rows (translation invariant);
    eps=None means 1e-12 for float64 inputs and 1e-4 for float32/float16/bfloat16.

    w_ij = f(q_i, k_j), or ½[f(q_i, k_j) + f(k_i, q_j)] with symmetric=True (N = M).

    r_i = Σ_j w_ij        c_j = Σ_i w_ij
    A_ij = none:  w_ij        count: w_ij / M
           row:   w_ij / r_i  sym:   w_ij / sqrt(r_i · c_j)
    (safe divide: 1/r_i, resp. 1/sqrt(r_i), is 0 where r_i == 0, same for c_j;
     1/sqrt of a negative sum is NaN.)

    out_i = aggregate: Σ_j A_ij v_j
            diffusion: Σ_j A_ij v_j − (Σ_j A_ij) u_i,  u = self_value, or value if None.
"""

import math

import torch

from nonlocal_ext.kernels import EULER_GAMMA  # a constant, checked against −ψ(1) in test_validation.py

DEFAULT_EPS = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def _exp(x):
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _affinity(a, b, kernel, scale, power, gamma, eps):
    """f(a, b) for two points a, b given as lists of floats."""
    if kernel in ("dot", "gaussian"):
        x = sum(a[d] * b[d] for d in range(len(a)))
        return scale * x if kernel == "dot" else _exp(scale * x)
    rho = sum((a[d] - b[d]) ** 2 for d in range(len(a)))
    if kernel == "rbf":
        return _exp(-scale * rho)
    norms = sum(t * t for t in a) + sum(t * t for t in b)
    if rho <= eps * norms:  # coincident pair: weight 0
        return 0.0
    if kernel == "fractional":
        return scale * (math.inf if rho == 0.0 else rho ** (-power / 2))
    if kernel == "log":
        return -scale * (-math.inf if rho == 0.0 else math.log(rho)) - gamma
    raise ValueError(f"unknown kernel {kernel!r}")


def _inverse(s):
    """1/s, with 1/0 taken as 0 (safe divide)."""
    return 0.0 if s == 0.0 else 1.0 / s


def _inverse_sqrt(s):
    """1/sqrt(s), with 0 for s == 0 and NaN for s < 0."""
    if s == 0.0:
        return 0.0
    if s < 0.0:
        return math.nan
    return 1.0 / math.sqrt(s)


def _one(q, k, v, u, kernel, scale, power, gamma, eps, normalize, update, symmetric):
    """One batch element on nested lists; returns out as an N×C nested list."""
    N, M, C = len(q), len(k), len(v[0])
    if kernel in ("rbf", "fractional", "log") and M:  # distances from the keys' mean point
        mu = [sum(row[d] for row in k) / M for d in range(len(k[0]))]
        q = [[x - m for x, m in zip(row, mu)] for row in q]
        k = [[x - m for x, m in zip(row, mu)] for row in k]

    # Affinity matrix W (N×M), symmetrized if asked.
    W = [[0.0] * M for _ in range(N)]
    for i in range(N):
        for j in range(M):
            w = _affinity(q[i], k[j], kernel, scale, power, gamma, eps)
            if symmetric:
                w = 0.5 * (w + _affinity(k[i], q[j], kernel, scale, power, gamma, eps))
            W[i][j] = w

    # Row and column sums.
    r = [sum(W[i][j] for j in range(M)) for i in range(N)]
    c = [sum(W[i][j] for i in range(N)) for j in range(M)]

    # Normalized affinity A.
    A = [[0.0] * M for _ in range(N)]
    for i in range(N):
        for j in range(M):
            if normalize == "none":
                A[i][j] = W[i][j]
            elif normalize == "count":
                A[i][j] = W[i][j] / M
            elif normalize == "row":
                A[i][j] = W[i][j] * _inverse(r[i])
            elif normalize == "sym":
                A[i][j] = W[i][j] * _inverse_sqrt(r[i]) * _inverse_sqrt(c[j])
            else:
                raise ValueError(f"unknown normalize {normalize!r}")

    # Aggregate or diffuse.
    out = [[0.0] * C for _ in range(N)]
    for i in range(N):
        a_rowsum = sum(A[i][j] for j in range(M))
        for ch in range(C):
            y = sum(A[i][j] * v[j][ch] for j in range(M))
            if update == "aggregate":
                out[i][ch] = y
            elif update == "diffusion":
                out[i][ch] = y - a_rowsum * u[i][ch]
            else:
                raise ValueError(f"unknown update {update!r}")
    return out


def loop_aggregate(query, key, value, kernel, *, scale=1.0, power=None, gamma=EULER_GAMMA,
                   eps=None, normalize="row", update="aggregate", symmetric=False,
                   self_value=None):
    """Naive ``nonlocal_aggregate``: see the module docstring. Returns float64 (..., N, C)."""
    batch = tuple(query.shape[:-2])
    N, M, C = query.shape[-2], key.shape[-2], value.shape[-1]
    if eps is None:
        eps = DEFAULT_EPS[query.dtype]
    if kernel == "fractional" and power is None:
        raise ValueError("fractional needs power")
    if symmetric and N != M:
        raise ValueError("symmetric needs N == M")
    if update == "diffusion" and self_value is None:
        if N != M:
            raise ValueError("default diffusion needs N == M")
        self_value = value

    def as_lists(t, rows):
        return t.detach().to("cpu", torch.float64).reshape(-1, rows, t.shape[-1]).tolist()

    q, k, v = as_lists(query, N), as_lists(key, M), as_lists(value, M)
    u = as_lists(self_value, N) if update == "diffusion" else [None] * len(q)
    outs = [_one(q[b], k[b], v[b], u[b], kernel, scale, power, gamma, eps,
                 normalize, update, symmetric) for b in range(len(q))]
    return torch.tensor(outs, dtype=torch.float64).reshape(*batch, N, C)
