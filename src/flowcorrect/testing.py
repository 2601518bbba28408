"""Testing tools for your own energies and correctors.

Two hypothesis strategies (action chunks, and contexts for the built-in energies), a
policy whose flow is known in closed form, and two checkers that run the laws
flowcorrect's own tests hold every energy and corrector to: finite, differentiable, a
batch equals its samples, jit equals no jit, no recompiles when values change.

!!! example

    ```python
    import flowcorrect as fc
    from flowcorrect.testing import check_corrector, check_energy

    check_energy(my_energy, context, actions, other_energy=my_energy_with_other_weights)
    check_corrector(fc.reference_recipe(), my_energy, context, actions)
    ```
"""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

try:
    import hypothesis.extra.numpy as hnp
    import hypothesis.strategies as st
except ImportError as e:  # an optional dependency: the rest of flowcorrect needs none
    raise ImportError(
        "flowcorrect.testing needs hypothesis, an optional dependency: "
        "pip install 'flowcorrect[testing]' (or pip install hypothesis)."
    ) from e

from ._correct import correct, correct_single
from ._correctors.base import AbstractCorrector
from ._custom_types import Actions, Context
from ._energy import EnergyFn, SplitEnergyFn, as_energy
from ._policy import AbstractPolicy as _AbstractPolicy

__all__ = ["GaussianPolicy", "action_chunks", "check_corrector", "check_energy", "chunk_pairs"]


def action_chunks(
    shapes: Sequence[tuple[int, ...]] = ((4, 3), (6, 2)),
    *,
    min_value: float | int = -10.0,
    max_value: float | int = 10.0,
    dtype: Any = np.float32,
) -> st.SearchStrategy[jax.Array]:
    """A hypothesis strategy for finite action chunks.

    Shapes are drawn from a small fixed set, so that a jitted function under test
    compiles once per shape rather than once per example.

    **Arguments:**

    - `shapes`: the shapes to draw from, e.g. `((50, 32),)`; a leading batch axis may
        be part of the shape.
    - `min_value`, `max_value`: bounds on every entry.
    - `dtype`: a NumPy floating dtype.

    **Returns:**

    A strategy producing `jax.Array`s.
    """
    # Subnormals are left out: XLA flushes them to zero in arithmetic on CPU and GPU.
    width = np.dtype(dtype).itemsize * 8
    elements = st.floats(min_value, max_value, width=width, allow_subnormal=False)
    return st.sampled_from(list(shapes)).flatmap(
        lambda shape: hnp.arrays(dtype, shape, elements=elements).map(jnp.asarray)
    )


def chunk_pairs(
    shapes: Sequence[tuple[int, ...]] = ((4, 3), (6, 2)),
    *,
    min_value: float | int = -10.0,
    max_value: float | int = 10.0,
) -> st.SearchStrategy[tuple[jax.Array, jax.Array]]:
    """A strategy for two chunks of the same shape: e.g. a context target and actions."""

    def pair(shape):
        elements = st.floats(min_value, max_value, width=32, allow_subnormal=False)
        arr = hnp.arrays(np.float32, shape, elements=elements).map(jnp.asarray)
        return st.tuples(arr, arr)

    return st.sampled_from(list(shapes)).flatmap(pair)


def _fail(what: str, detail: str) -> None:
    raise AssertionError(f"{what}: {detail}")


def _scaled(tree: Any, factor: float) -> Any:
    """Multiplies every floating value in `tree` by `factor`: same structure, new values.

    Python floats are scaled too: a hyperparameter kept as one is static under `jit`,
    so a new value recompiles, which is what the recompile check should catch.
    """

    def f(x):
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating):
            return x * factor
        if isinstance(x, float):
            return x * factor
        return x

    return jax.tree.map(f, tree)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs) if eqx.is_array(xs[0]) else xs[0], *trees)


def _perturbations(actions: Actions, n: int) -> list[Actions]:
    keys = jax.random.split(jax.random.key(1234), n)
    scale = 0.1 * (1 + jnp.std(actions))
    return [actions + scale * jax.random.normal(k, actions.shape, actions.dtype) for k in keys]


def check_energy(
    energy: EnergyFn,
    context: Context,
    actions: Actions,
    *,
    other_energy: EnergyFn | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> None:
    """Checks that an energy is usable by flowcorrect; raises `AssertionError` if not.

    Checks: one chunk gives a finite floating scalar; its gradient is finite and shaped
    like the chunk; `score(encode(c), a) == energy(c, a)` for a split energy; jit
    equals no jit; `vmap` over chunks equals calls one by one; and a jitted call does
    not recompile for new action values nor for `other_energy`, a second instance of
    the same energy with other parameter values (an energy that keeps a
    hyperparameter as a Python float fails this one).

    **Arguments:**

    - `energy`: the energy under test.
    - `context`, `actions`: one observation's context and one chunk.
    - `other_energy`: optional, the same energy with other values.
    - `rtol`, `atol`: tolerances for the comparisons.
    """
    actions = jnp.asarray(actions)
    value = energy(context, actions)
    if not (isinstance(value, jax.Array) and value.shape == ()):
        _fail("energy output", f"expected a scalar array, got {type(value).__name__} "
              f"of shape {getattr(value, 'shape', None)}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        _fail("energy output", f"expected a floating dtype, got {value.dtype}")
    if not jnp.isfinite(value):
        _fail("energy value", f"not finite ({value}) on the given context and actions")
    grad = jax.grad(lambda a: energy(context, a))(actions)
    if grad.shape != actions.shape:
        _fail("energy gradient", f"shape {grad.shape} != actions shape {actions.shape}")
    if not jnp.all(jnp.isfinite(grad)):
        _fail("energy gradient", "not finite on the given context and actions")
    if isinstance(energy, SplitEnergyFn):
        split = energy.score(energy.encode(context), actions)
        if not np.allclose(split, value, rtol=rtol, atol=atol):
            _fail("encode/score", f"score(encode(c), a) = {split} but energy(c, a) = {value}")

    jitted = eqx.filter_jit(eqx.debug.assert_max_traces(lambda e, c, a: e(c, a), max_traces=1))
    jit_value = jitted(energy, context, actions)
    if not np.allclose(jit_value, value, rtol=rtol, atol=atol):
        _fail("jit", f"jitted energy {jit_value} != un-jitted {value}")

    samples = _perturbations(actions, 3)
    batched = jax.vmap(lambda a: energy(context, a))(jnp.stack(samples))
    singles = jnp.stack([energy(context, a) for a in samples])
    if not np.allclose(batched, singles, rtol=rtol, atol=atol):
        _fail("batch", f"vmap over chunks gave {batched}, one by one gave {singles}")

    try:
        for a in samples:
            jitted(energy, context, a)
        if other_energy is not None:
            jitted(other_energy, context, actions)
    except RuntimeError as e:
        _fail("recompile", f"the jitted energy was traced again for new values ({e})")


def _correct_one(energy, context, actions, corrector, key):
    energy = as_energy(energy)
    return correct_single(energy, energy.encode(context), actions, corrector, key)


def check_corrector(
    corrector: AbstractCorrector,
    energy: EnergyFn,
    context: Context,
    actions: Actions,
    *,
    key: jax.Array | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> None:
    """Checks a corrector with an energy under the laws of [`flowcorrect.correct`][].

    Checks: the result keeps shape and dtype and is finite; jit equals no jit; a batch
    equals its samples (sample `i` uses key `jax.random.split(key, B)[i]`); and new
    action values or new floating hyperparameter values in the corrector do not
    recompile. Raises `AssertionError` naming the broken law.

    **Arguments:**

    - `corrector`: the corrector under test.
    - `energy`, `context`, `actions`: one observation's energy, context and chunk.
    - `key`: the PRNG key; defaults to `jax.random.key(0)`.
    - `rtol`, `atol`: tolerances for the comparisons.
    """
    actions = jnp.asarray(actions)
    key = jax.random.key(0) if key is None else key
    out, info = correct(energy, context, actions, corrector=corrector, key=key)
    if out.shape != actions.shape or out.dtype != actions.dtype:
        _fail("shape", f"corrected {out.shape} {out.dtype} != input {actions.shape} "
              f"{actions.dtype}")
    if not jnp.all(jnp.isfinite(out)):
        _fail("finite", "the corrected chunk is not finite")
    ref_out, ref_info = _correct_one(energy, context, actions, corrector, key)
    if not np.allclose(out, ref_out, rtol=rtol, atol=atol):
        _fail("jit", f"jitted correction differs from un-jitted by "
              f"{float(jnp.max(jnp.abs(out - ref_out)))}")
    if bool(info.fell_back) != bool(ref_info.fell_back):
        _fail("jit", "jitted and un-jitted disagree on the fallback flag")

    samples = _perturbations(actions, 3)
    batch_out, _ = correct(
        energy, _stack([context] * 3), jnp.stack(samples), corrector=corrector, key=key
    )
    keys = jax.random.split(key, 3)
    for i, (a, k) in enumerate(zip(samples, keys, strict=True)):
        single, _ = correct(energy, context, a, corrector=corrector, key=k)
        if not np.allclose(batch_out[i], single, rtol=rtol, atol=atol):
            _fail("batch", f"sample {i} of a batch differs from the same sample alone by "
                  f"{float(jnp.max(jnp.abs(batch_out[i] - single)))}")

    counted = eqx.filter_jit(eqx.debug.assert_max_traces(_correct_one, max_traces=1))
    try:
        counted(energy, context, actions, corrector, key)
        counted(energy, context, samples[0], _scaled(corrector, 0.5), key)
    except RuntimeError as e:
        _fail("recompile", f"new values recompiled the correction ({e})")


def _floating(x: Any) -> jax.Array:
    """`x` as an array, float32 unless it is already floating (float64 stays float64)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


class GaussianPolicy(_AbstractPolicy):
    """A policy whose flow is known in closed form: the exact velocity from `N(0, I)`
    noise to `N(mean, std**2 I)` chunks, in either time convention.

    With progress `p` from noise (`p = 0`) to data (`p = 1`), `x = (1 - p) eps + p a`;
    for Gaussians `E[a | x]` and `E[eps | x]` are linear in `x`, so the velocity is
    exact and every placement's effect can be computed by hand. The observation is
    ignored except as the energy's context (`energy_context` returns it).

    **Arguments:**

    - `mean`: the chunk the samples centre on, `(horizon, action_dim)`.
    - `std`: their standard deviation, a scalar `> 0`.
    - `convention`: [`flowcorrect.OpenPI`][] (default, `t = 1` is noise) or
        [`flowcorrect.Reverse`][].
    """

    mean: jax.Array
    std: jax.Array
    convention: Any
    chunk_shape: tuple[int, int] = eqx.field(static=True)

    def __init__(self, mean: Any, std: Any = 1.0, convention: Any = None):
        import flowcorrect as _fc

        self.mean = _floating(mean)
        if self.mean.ndim != 2:
            raise ValueError(
                f"GaussianPolicy `mean` must be a (horizon, action_dim) chunk; got shape "
                f"{self.mean.shape}."
            )
        self.std = _floating(std)
        if self.std.shape != () or not float(self.std) > 0:
            raise ValueError(f"GaussianPolicy `std` must be a scalar > 0; got {std!r}.")
        self.convention = _fc.OpenPI() if convention is None else convention
        self.chunk_shape = tuple(self.mean.shape)

    def condition(self, observation):
        return observation

    def velocity(self, cond, x, t):
        import flowcorrect as _fc

        reverse = isinstance(self.convention, _fc.Reverse)
        p = t if reverse else 1 - t
        var = (1 - p) ** 2 + p**2 * self.std**2
        centred = x - p * self.mean
        a_hat = self.mean + p * self.std**2 / var * centred
        eps_hat = (1 - p) / var * centred
        dx_dp = a_hat - eps_hat
        return dx_dp if reverse else -dx_dp

    def energy_context(self, cond):
        return cond
