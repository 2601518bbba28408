"""Correctors that wrap other correctors: clipping, masks, acceptance, repetition."""

from collections.abc import Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._custom_types import Actions, ChunkEnergy, IndexLike, Key, RealLike
from .._energy import broadcast_bounds, check_bounds
from .._misc import accumulation_dtype, concrete, count, safe_norm, scalar_float, shape_str
from .base import AbstractCorrector, check_is_corrector, scale_step

# Constructor arguments that are validated by hand are annotated `Any`: the checks below
# give messages that name the fix, which a runtime type checker would pre-empt.


class ClipStep(AbstractCorrector[Any]):
    """Clips the step of `inner` relative to the size of the chunk.

    The change made by one step is scaled down, per sample, so that
    `||a_new - a|| <= clip_frac * ||a_ref||`, norms over the whole chunk (Frobenius).

    **Arguments:**

    - `inner`: the corrector whose step is clipped.
    - `clip_frac`: the largest step as a fraction of the chunk's norm, a finite
        number `> 0`.
    - `relative_to`: which chunk `a_ref` is. `"current"` (default, as in the
        reference implementation): the chunk entering this step, so K steps can move
        the chunk by up to about `K * clip_frac` of its size. `"initial"`: the chunk
        entering the whole correction, a fixed budget per step.

    Norms are computed with [`flowcorrect._misc.safe_norm`] (scaled, summed in at
    least float32), so they do not overflow in float16 or bfloat16. When the bound or
    the step's norm still cannot be computed (a non-finite entry), the step is
    dropped: the chunk is returned unchanged and the step counts as not accepted
    (`num_accepted` 0). The bound holds up to the rounding of `a + step` in the
    actions' dtype. A chunk of norm zero cannot move under this clip.
    """

    inner: AbstractCorrector
    clip_frac: Float[Array, ""]
    relative_to: Literal["current", "initial"] = eqx.field(static=True)

    def __init__(
        self,
        inner: AbstractCorrector,
        clip_frac: RealLike = 0.2,
        relative_to: Literal["current", "initial"] = "current",
    ):
        check_is_corrector("ClipStep", "inner", inner)
        self.inner = inner
        self.clip_frac = scalar_float("ClipStep", "clip_frac", clip_frac, "0.2")
        self.relative_to = relative_to

    def __check_init__(self):
        c = concrete(self.clip_frac)
        if c is not None and not (np.isfinite(c) and c > 0):
            raise ValueError(
                f"ClipStep `clip_frac` must be a finite number > 0 (0.2 allows steps of "
                f"20% of the chunk's norm); got {c}. To switch correction off use "
                "Repeat(..., num_steps=0); to not clip, leave out the ClipStep."
            )
        if self.relative_to not in ("current", "initial"):
            raise ValueError(
                f"ClipStep `relative_to` must be 'current' or 'initial'; got "
                f"{self.relative_to!r}."
            )

    def init(self, energy: ChunkEnergy, actions: Actions):
        ref = safe_norm(actions) if self.relative_to == "initial" else None
        return self.inner.init(energy, actions), ref

    def step(self, energy: ChunkEnergy, actions: Actions, state, key: Key):
        inner_state, ref = state
        proposal, inner_state, n = self.inner.step(energy, actions, inner_state, key)
        if ref is None:
            ref = safe_norm(actions)
        acc = accumulation_dtype(actions.dtype)
        max_norm = self.clip_frac.astype(acc) * ref.astype(acc)
        # The difference in the accumulation dtype: in float16 `proposal - actions` can
        # overflow although both are finite.
        step_norm = safe_norm(proposal.astype(acc) - actions.astype(acc))
        computable = jnp.isfinite(max_norm) & jnp.isfinite(step_norm)
        safe = jnp.where(step_norm > 0, step_norm, 1)
        scale = jnp.where(step_norm > max_norm, max_norm / safe, 1)
        scale = jnp.where(computable, scale, 0)
        out = scale_step(actions, proposal, scale)
        return out, (inner_state, state[1]), jnp.where(computable, n, 0)


def _axis_spec(name: str, value: Any, example: str) -> Array | None:
    """`horizon` / `action_dims` of Mask as an int32 scalar or a boolean vector."""
    if value is None:
        return None
    fix = (
        f"give an int k >= 1 (the first k, e.g. {name}={example}) or a boolean array, "
        f"True where actions may change"
    )
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"Mask `{name}` got the boolean {value}, not a count: {fix}.")
    if isinstance(value, int | np.integer):
        k = count("Mask", name, value, 1, example, "the first k entries may change")
        return jnp.asarray(k, dtype=jnp.int32)
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"Mask `{name}` got {type(value).__name__}: {fix}.") from None
    if array.dtype == bool:
        if array.ndim != 1:
            raise ValueError(
                f"Mask `{name}` as a boolean mask must be 1-d; got shape {shape_str(array)}: "
                f"{fix}."
            )
        return array
    if jnp.issubdtype(array.dtype, jnp.integer) and array.ndim == 0:
        return array.astype(jnp.int32)
    if isinstance(value, float | np.floating):
        shown = f"{type(value).__name__} {value!r}"
    else:
        shown = f"{array.dtype} array of shape {shape_str(array)}"
    raise TypeError(
        f"Mask `{name}` must be an int or a boolean array; got {shown} "
        f"(a non-integer count is not rounded, and a 0/1 array is not read as a mask; "
        f"use .astype(bool)): {fix}."
    )


def _check_axis_spec(name: str, spec: Array | None, example: str) -> None:
    if spec is None:
        return
    value = concrete(spec)
    if spec.dtype == bool:
        if value is not None and not value.any():
            raise ValueError(
                f"Mask `{name}` is all False, so nothing would ever be corrected; set at "
                "least one entry True, or use Repeat(..., num_steps=0) to switch "
                "correction off."
            )
    elif value is not None and value < 1:
        raise ValueError(
            f"Mask `{name}` must be >= 1 (the first k entries may change, e.g. "
            f"{name}={example}); got {int(value)}. To switch correction off use "
            "Repeat(..., num_steps=0)."
        )


def _axis_mask(name: str, spec: Array | None, actions: Actions, axis: int) -> Array:
    """The boolean mask over one axis of the chunk, shaped to broadcast against it."""
    size = actions.shape[axis]
    if spec is None:
        out = jnp.ones(size, bool)
    elif spec.dtype != bool:
        out = jnp.arange(size) < spec
    elif spec.shape != (size,):
        raise ValueError(
            f"Mask `{name}` is a boolean mask of shape {shape_str(spec)} but the actions "
            f"have shape {shape_str(actions)}; the mask needs shape ({size},), or give an "
            f"int k to correct the first k."
        )
    else:
        out = spec
    return out[:, None] if axis == 0 else out[None, :]


class Mask(AbstractCorrector[Any]):
    """Lets `inner` change only some entries of the chunk; the rest stay bit-identical.

    The entries that may change are those whose horizon step is selected by
    `horizon` and whose action dimension is selected by `action_dims`; give one or
    both. Each is either an int `k` (the first `k`, stored as an array so changing it
    does not recompile) or a boolean array, `True` where actions may change.

    **Arguments:**

    - `inner`: the corrector to restrict.
    - `horizon`: `1` corrects only the action executed next; or a boolean array of
        shape `(horizon,)`. `None` (default): every step of the horizon.
    - `action_dims`: openpi pads actions to 32 dimensions while a LIBERO arm uses the
        first 7: `action_dims=7`; or a boolean array of shape `(action_dim,)`. `None`
        (default): every dimension.

    !!! example

        ```python
        # Only the next action, only the 7 arm dimensions of openpi's 32:
        fc.Mask(fc.GradientStep(0.1), horizon=1, action_dims=7)
        ```
    """

    inner: AbstractCorrector
    horizon: Int[Array, ""] | Bool[Array, " horizon"] | None
    action_dims: Int[Array, ""] | Bool[Array, " action_dim"] | None

    def __init__(
        self,
        inner: AbstractCorrector,
        *,
        horizon: IndexLike | None = None,
        action_dims: IndexLike | None = None,
    ):
        check_is_corrector("Mask", "inner", inner)
        self.inner = inner
        self.horizon = _axis_spec("horizon", horizon, "1")
        self.action_dims = _axis_spec("action_dims", action_dims, "7")

    def __check_init__(self):
        if self.horizon is None and self.action_dims is None:
            raise ValueError(
                "Mask needs `horizon`, `action_dims` or both (e.g. Mask(inner, horizon=1) "
                "corrects only the next action); without either, use `inner` directly."
            )
        _check_axis_spec("horizon", self.horizon, "1")
        _check_axis_spec("action_dims", self.action_dims, "7")

    def _mask(self, actions: Actions) -> Array:
        return _axis_mask("horizon", self.horizon, actions, 0) & _axis_mask(
            "action_dims", self.action_dims, actions, 1
        )

    def init(self, energy: ChunkEnergy, actions: Actions):
        self._mask(actions)
        return self.inner.init(energy, actions)

    def step(self, energy: ChunkEnergy, actions: Actions, state, key: Key):
        mask = self._mask(actions)
        proposal, state, n = self.inner.step(energy, actions, state, key)
        return jnp.where(mask, proposal, actions), state, n


class Backtrack(AbstractCorrector[Any]):
    """Keeps a step of `inner` only if the energy does not rise (monotone correction).

    The step `d = inner(a) - a` is tried at full length; while `E(a + d) > E(a)` it is
    halved, up to `max_halvings` times; if no length lowers (or keeps) the energy,
    the chunk is kept unchanged and the step counts as rejected. For a gradient step
    halving the step is halving `alpha` (before any clip). Under this wrapper the
    energy never increases, whatever `inner` proposes, and a step whose energy is not
    finite is never taken.

    **Arguments:**

    - `inner`: the corrector proposing steps.
    - `max_halvings`: how many times the step may be halved, an int `>= 0`.
    """

    inner: AbstractCorrector
    max_halvings: int = eqx.field(static=True)

    def __init__(self, inner: AbstractCorrector, max_halvings: int = 4):
        check_is_corrector("Backtrack", "inner", inner)
        self.inner = inner
        self.max_halvings = count("Backtrack", "max_halvings", max_halvings, 0, "4")

    def init(self, energy: ChunkEnergy, actions: Actions):
        return self.inner.init(energy, actions)

    def step(self, energy: ChunkEnergy, actions: Actions, state, key: Key):
        e0 = energy(actions)
        proposal, new_state, n = self.inner.step(energy, actions, state, key)

        def cond(carry):
            j, accepted, _ = carry
            return jnp.logical_not(accepted) & (j <= self.max_halvings)

        def body(carry):
            j, _, _ = carry
            scale = jnp.exp2(-j.astype(accumulation_dtype(actions.dtype)))
            candidate = scale_step(actions, proposal, scale)
            return j + 1, energy(candidate) <= e0, candidate

        init = (jnp.asarray(0, jnp.int32), jnp.array(False), actions)
        _, accepted, candidate = jax.lax.while_loop(cond, body, init)
        out = jnp.where(accepted, candidate, actions)
        state = jax.tree.map(lambda new, old: jnp.where(accepted, new, old), new_state, state)
        return out, state, jnp.where(accepted, n, 0)


def _bound(name: str, value: Any) -> Array:
    fix = "give a number or an array broadcastable to (horizon, action_dim)"
    if isinstance(value, bool | np.bool_ | str | bytes) or value is None:
        raise TypeError(f"ProjectBounds `{name}` got {type(value).__name__}: {fix}.")
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"ProjectBounds `{name}` got {type(value).__name__}: {fix}.") from None
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(f"ProjectBounds `{name}` has dtype {array.dtype}: {fix}.")
    return array.astype(jnp.result_type(float))


class ProjectBounds(AbstractCorrector[None]):
    """Projects the chunk onto action bounds, `clip(a, low, high)`; counts no step.

    Put it after a step (`Chain(step, ProjectBounds(low, high))`) to keep every
    corrected action inside what the robot accepts.

    **Arguments:**

    - `low`, `high`: scalars or arrays broadcastable to `(horizon, action_dim)`,
        `low <= high`.
    """

    low: Float[Array, "*low_shape"]
    high: Float[Array, "*high_shape"]

    def __init__(self, low: RealLike, high: RealLike):
        self.low = _bound("low", low)
        self.high = _bound("high", high)

    def __check_init__(self):
        check_bounds(self.low, self.high)
        for name, bound, bad in (("low", self.low, np.inf), ("high", self.high, -np.inf)):
            value = concrete(bound)
            if value is None:
                continue
            if np.isnan(value).any():
                raise ValueError(
                    f"ProjectBounds `{name}` has NaN at {int(np.isnan(value).sum())} "
                    "entries; give a number per entry (-inf / inf for an unbounded side)."
                )
            if (value == bad).any():
                raise ValueError(
                    f"ProjectBounds `{name}` is {bad} at {int((value == bad).sum())} "
                    f"entries, which would move every action to {bad}; use "
                    f"{-bad} for an unbounded side."
                )

    def init(self, energy: ChunkEnergy, actions: Actions) -> None:
        broadcast_bounds("ProjectBounds", self.low, self.high, actions)
        return None

    def step(self, energy: ChunkEnergy, actions: Actions, state: None, key: Key):
        low, high = broadcast_bounds("ProjectBounds", self.low, self.high, actions)
        return jnp.clip(actions, low, high), None, jnp.asarray(0, jnp.int32)


class Repeat(AbstractCorrector[Any]):
    """Runs `inner` for `num_steps` steps in a `lax.scan` (compiled once, not unrolled).

    **Arguments:**

    - `inner`: the corrector to repeat.
    - `num_steps`: how many steps, an int `>= 0`; 0 switches correction off (the
        chunk is returned unchanged). Static: a new value compiles a new function.
    """

    inner: AbstractCorrector
    num_steps: int = eqx.field(static=True)

    def __init__(self, inner: AbstractCorrector, num_steps: int):
        check_is_corrector("Repeat", "inner", inner)
        self.inner = inner
        # 0 = off, 1-3 real-time, 5-10 stronger.
        self.num_steps = count("Repeat", "num_steps", num_steps, 0, "3")

    def init(self, energy: ChunkEnergy, actions: Actions):
        return self.inner.init(energy, actions)

    def step(self, energy: ChunkEnergy, actions: Actions, state, key: Key):
        if self.num_steps == 0:
            return actions, state, jnp.asarray(0, jnp.int32)

        def body(carry, step_key):
            a, s, count = carry
            a, s, n = self.inner.step(energy, a, s, step_key)
            return (a, s, count + n), None

        keys = jax.random.split(key, self.num_steps)
        init = (actions, state, jnp.asarray(0, jnp.int32))
        (actions, state, count), _ = jax.lax.scan(body, init, keys)
        return actions, state, count


class Chain(AbstractCorrector[tuple]):
    """Runs several correctors one after the other within a single step.

    Each child keeps its own state (a tuple of states, as in `optax.chain`).

    **Arguments:**

    - `correctors`: the correctors, applied in order.
    """

    correctors: tuple[AbstractCorrector, ...]

    def __init__(self, *correctors: AbstractCorrector | Sequence[AbstractCorrector]):
        if len(correctors) == 1 and isinstance(correctors[0], list | tuple):
            correctors = tuple(correctors[0])
        for i, c in enumerate(correctors):
            check_is_corrector("Chain", f"correctors[{i}]", c)
        self.correctors = tuple(correctors)  # type: ignore[arg-type]

    def __check_init__(self):
        if not self.correctors:
            raise ValueError("Chain needs at least one corrector, e.g. Chain(GradientStep(0.1)).")

    def init(self, energy: ChunkEnergy, actions: Actions) -> tuple:
        return tuple(c.init(energy, actions) for c in self.correctors)

    def step(self, energy: ChunkEnergy, actions: Actions, state: tuple, key: Key):
        keys = jax.random.split(key, len(self.correctors))
        new_states = []
        count = jnp.asarray(0, jnp.int32)
        for c, s, k in zip(self.correctors, state, keys, strict=True):
            actions, s, n = c.step(energy, actions, s, k)
            new_states.append(s)
            count = count + n
        return actions, tuple(new_states), count
