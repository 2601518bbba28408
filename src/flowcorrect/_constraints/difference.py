"""Bounds on the finite differences of a chunk along time, `|Δ^k a| <= limit`: the
projection shared by [`flowcorrect.constraints.MaxStepChange`][] (`k = 1`) and
[`flowcorrect.constraints.MaxJerk`][] (`k = 2, 3`).

The set is a convex polytope that couples consecutive actions, so no closed form
exists; the action dimensions are independent of each other. The projection solves,
per dimension, the quadratic programme

`min ||x - y||^2  subject to  -limit <= D x + c <= limit`,

where `D` holds the rows of the `k`-th difference over the chunk prefixed by the given
previous actions and `c` their contribution, in the dual: with multipliers `mu`,
`x = y - D^T mu`. Each round runs 20 accelerated proximal-gradient steps on the dual
(FISTA with adaptive restart, O'Donoghue and Candès 2015), then up to 3 primal-dual
active-set steps (Hintermüller, Ito and Kunisch 2002, a semismooth Newton method): each
guesses the active rows from the proximal step and solves the equality-constrained
problem on them exactly. The first-order steps bring the iterate near the solution,
where the active-set steps converge fast and cannot cycle. It stops when the KKT
conditions hold to `tol` (every row within `limit + tol * scale`, multipliers of the
right sign to `tol * scale`, plus the rounding of the linear solve), or after
`max_steps` rounds; then the iterate is made feasible by clamping each action in turn
against the ones before it (feasible, no longer the nearest point), so the result is
feasible whatever happens.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool

from .._misc import shape_str
from .base import Dims, acc_dtype, check_broadcast, l2, parameter, select


def difference_rows(horizon: int, num_previous: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the `order`-th difference over `[previous; chunk]` that involve the
    chunk: `(D_chunk (m, horizon), D_previous (m, num_previous))`."""
    n = num_previous + horizon
    coef = [(-1) ** (order - j) * math.comb(order, j) for j in range(order + 1)]
    rows = range(max(0, num_previous - order), max(0, n - order))
    d = np.zeros((len(rows), n))
    for i, r in enumerate(rows):
        d[i, r : r + order + 1] = coef
    return d[:, num_previous:], d[:, :num_previous]


def solve_rounding(horizon: int, num_previous: int, order: int, dtype: Any) -> float:
    """The relative accuracy of the exact solve in `dtype`: `eps * sqrt(cond(D D^T))`.

    An error of the multipliers along an eigenvector of `D D^T` of eigenvalue `l` moves
    the chunk by `sqrt(l)` times it, so `x`'s error is about `eps * sqrt(cond)` relative
    (every principal submatrix is at most as ill-conditioned as `D D^T`). Small for
    first differences; for third differences over 50 steps with the previous actions
    given, about `4e-3` in float32 and `1e-11` in float64.
    """
    dx, _ = difference_rows(horizon, num_previous, order)
    if dx.shape[0] == 0:
        return 0.0
    eig = np.linalg.eigvalsh(dx @ dx.T)
    return float(jnp.finfo(dtype).eps) * math.sqrt(eig[-1] / eig[0])


def residuals(a: Array, previous: Array | None, order: int) -> Array:
    """`D x + c`: the `order`-th differences involving the chunk, `(m, k)`."""
    num_prev = 0 if previous is None else previous.shape[0]
    dx, dp = difference_rows(a.shape[0], num_prev, order)
    r = jnp.asarray(dx, a.dtype) @ a
    if num_prev:
        r = r + jnp.asarray(dp, a.dtype) @ previous.astype(a.dtype)
    return r


def difference_violation(a: Array, previous: Array | None, limit: Array, order: int) -> Array:
    """`||relu(|D x + c| - limit)||` in the accumulation dtype."""
    acc = acc_dtype(a)
    r = residuals(a.astype(acc), previous, order)
    return l2(jnp.maximum(jnp.abs(r) - limit.astype(acc)[None, :], 0))


def project_differences(
    y: Array, previous: Array | None, limit: Array, order: int, max_steps: int, tol: Array
) -> tuple[Array, Bool[Array, ""]]:
    """The projection of `y` `(horizon, k)` onto `|D x + c| <= limit` (per column), in
    `y`'s dtype (the accumulation dtype), and whether the method converged."""
    horizon = y.shape[0]
    num_prev = 0 if previous is None else previous.shape[0]
    dx_np, dp_np = difference_rows(horizon, num_prev, order)
    m = dx_np.shape[0]
    if m == 0:  # the chunk is too short for a difference of this order
        return y, jnp.asarray(True)
    dtype = y.dtype
    q_np = dx_np @ dx_np.T
    step = 1.0 / float(np.linalg.eigvalsh(q_np)[-1])  # 1 / Lipschitz constant of the dual
    dx, q = jnp.asarray(dx_np, dtype), jnp.asarray(q_np, dtype)
    b = dx @ y
    if num_prev:
        b = b + jnp.asarray(dp_np, dtype) @ previous.astype(dtype)
    delta = limit.astype(dtype)[None, :]
    eye = jnp.eye(m, dtype=dtype)
    scale = jnp.maximum(jnp.max(jnp.abs(y)), jnp.max(jnp.abs(b)))
    relative = tol.astype(dtype) + solve_rounding(horizon, num_prev, order, dtype)
    slack = relative * jnp.maximum(scale, jnp.finfo(dtype).tiny)

    def kkt(mu, up, lo):
        r = b - q @ mu
        return (
            jnp.all(jnp.abs(r) <= delta + slack)
            & jnp.all(jnp.where(up, mu >= -slack, True))
            & jnp.all(jnp.where(lo, mu <= slack, True))
        )

    def guess(mu):
        # The rows the proximal-gradient step from `mu` holds active (the sign pattern of
        # soft(mu + step * r, step * limit)): the semismooth Newton guess.
        g = mu + step * (b - q @ mu)
        return g > step * delta, g < -step * delta

    def solve(up, lo):
        # The equality-constrained problem on the guessed rows, solved exactly: the
        # projection itself once those are the right rows.
        active = up | lo
        target = jnp.where(up, delta, jnp.where(lo, -delta, 0))
        rhs = jnp.where(active, b - target, 0)
        both = active.T[:, :, None] & active.T[:, None, :]
        matrix = jnp.where(both, q[None], eye[None])
        return jnp.linalg.solve(matrix, rhs.T[:, :, None])[:, :, 0].T

    def polish(mu):
        # A few active-set (semismooth Newton) steps from the first-order iterate, which
        # converge fast once it is near the solution.
        def newton(_, carry):
            current, ok = carry
            up, lo = guess(current)
            new = solve(up, lo)
            return jnp.where(ok, current, new), ok | kkt(new, up, lo)

        return jax.lax.fori_loop(0, _NEWTON_STEPS, newton, (mu, jnp.asarray(False)))

    def fista(_, state):
        mu, z, t = state
        g = z - step * (q @ z - b)
        new = jnp.sign(g) * jnp.maximum(jnp.abs(g) - step * delta, 0)
        t_new = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
        # Adaptive restart (O'Donoghue and Candès 2015), per dimension: momentum is
        # dropped where it points uphill.
        uphill = jnp.sum((z - new) * (new - mu), axis=0, keepdims=True) > 0
        t_new = jnp.where(uphill, 1.0, t_new).astype(dtype)
        z = jnp.where(uphill, new, new + ((t - 1) / t_new) * (new - mu))
        return new, z, t_new

    def cond(state):
        _, _, _, k, done = state
        return jnp.logical_not(done) & (k < max_steps)

    def body(state):
        mu, z, t, k, _ = state
        mu, z, t = jax.lax.fori_loop(0, _ITERATIONS_PER_ROUND, fista, (mu, z, t))
        exact, ok = polish(mu)
        return jnp.where(ok, exact, mu), z, t, k + 1, ok

    mu0 = jnp.zeros_like(b)
    t0 = jnp.ones((1, b.shape[1]), dtype)
    r0 = b
    # A feasible (or non-finite) chunk needs no step: it is its own projection.
    done0 = jnp.all(jnp.abs(r0) <= delta) | jnp.logical_not(jnp.all(jnp.isfinite(b)))
    mu, _, _, _, converged = jax.lax.while_loop(
        cond, body, (mu0, mu0, t0, jnp.asarray(0, jnp.int32), done0)
    )
    x = y - dx.T @ mu
    x = jax.lax.cond(
        converged, lambda x: x, lambda x: _clamp_in_turn(x, previous, delta[0], order), x
    )
    return x, converged


# Proximal-gradient steps between two attempts at the exact solve, and the active-set
# steps of each attempt.
_ITERATIONS_PER_ROUND = 20
_NEWTON_STEPS = 3


def _clamp_in_turn(x: Array, previous: Array | None, limit: Array, order: int) -> Array:
    """A feasible chunk near `x`: each action clamped, in time order, so that the
    difference ending at it is within `limit` given the (already clamped) ones before
    it. The newest entry's coefficient in a difference is 1, so this always succeeds."""
    k = x.shape[1]
    num_prev = 0 if previous is None else previous.shape[0]
    coef = jnp.asarray([(-1) ** (order - j) * math.comb(order, j) for j in range(order)],
                       x.dtype)
    window = jnp.zeros((order, k), x.dtype)
    if num_prev:
        last = previous[-order:].astype(x.dtype)
        window = window.at[order - last.shape[0] :].set(last)
    exists = jnp.arange(x.shape[0]) + num_prev >= order

    def step(window, xs):
        a, has_row = xs
        rest = coef @ window
        clamped = jnp.clip(a, -limit - rest, limit - rest)
        a = jnp.where(has_row, clamped, a)
        return jnp.concatenate([window[1:], a[None]], axis=0), a

    _, out = jax.lax.scan(step, window, (x, exists))
    return out


def check_limit(owner: str, name: str, value: Any) -> Array:
    limit = parameter(owner, name, value, f"{owner}({name}=0.05) or one value per dimension")
    if limit.ndim > 1:
        raise ValueError(
            f"{owner} `{name}` must be one number or one per constrained dimension, shape "
            f"(k,); got shape {limit.shape}."
        )
    if not isinstance(limit, jax.core.Tracer) and bool(jnp.any(limit < 0)):
        raise ValueError(
            f"{owner} `{name}` must be >= 0 (0 holds the actions constant); got "
            f"{jnp.asarray(limit).tolist()}."
        )
    return limit


def check_previous(owner: str, previous: Array, chunk: Array, dims: Dims) -> Array:
    if previous.shape[-1] != chunk.shape[1]:
        raise ValueError(
            f"{owner} `previous` has shape {shape_str(previous)} but the chunk has "
            f"{chunk.shape[1]} action dimensions (shape {shape_str(chunk)}); give whole "
            "actions, `dims` selects from them."
        )
    return select(previous, dims)


def limit_for(owner: str, name: str, limit: Array, k: int) -> Array:
    check_broadcast(owner, name, limit, (k,), "one value per constrained dimension")
    return jnp.broadcast_to(limit, (k,))
