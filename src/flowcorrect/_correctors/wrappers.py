"""Correctors that wrap other correctors: clipping, masks, acceptance, repetition."""

from collections.abc import Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._custom_types import Actions, ChunkEnergy, Key
from .._energy import broadcast_bounds, check_bounds
from .._misc import concrete, float_array, shape_str
from .base import AbstractCorrector, scale_step


class ClipStep(AbstractCorrector[Any]):
    """Clips the step of `inner` relative to the size of the chunk.

    The change made by one step is scaled down, per sample, so that
    `||a_new - a|| <= clip_frac * ||a_ref||`, norms over the whole chunk (Frobenius).

    **Arguments:**

    - `inner`: the corrector whose step is clipped.
    - `clip_frac`: the largest step as a fraction of the chunk's norm, `> 0`.
    - `relative_to`: which chunk `a_ref` is. `"current"` (default, as in the
        reference implementation): the chunk entering this step, so K steps can move
        the chunk by up to about `K * clip_frac` of its size. `"initial"`: the chunk
        entering the whole correction, a fixed budget per step.

    The bound holds up to the rounding of `a + step` in the actions' dtype. A chunk of
    norm zero cannot move under this clip.
    """

    inner: AbstractCorrector
    clip_frac: Float[Array, ""]
    relative_to: Literal["current", "initial"] = eqx.field(static=True)

    def __init__(
        self,
        inner: AbstractCorrector,
        clip_frac: Any = 0.2,
        relative_to: Literal["current", "initial"] = "current",
    ):
        self.inner = inner
        self.clip_frac = float_array(clip_frac)
        self.relative_to = relative_to

    def __check_init__(self):
        c = concrete(self.clip_frac)
        if c is not None and not c > 0:
            raise ValueError(
                f"`clip_frac` must be > 0 (0.2 allows steps of 20% of the chunk's norm); "
                f"got {c}. To switch correction off use Repeat(..., num_steps=0)."
            )
        if self.relative_to not in ("current", "initial"):
            raise ValueError(
                f"`relative_to` must be 'current' or 'initial'; got {self.relative_to!r}."
            )

    def init(self, energy: ChunkEnergy, actions: Actions):
        ref = jnp.linalg.norm(actions) if self.relative_to == "initial" else None
        return self.inner.init(energy, actions), ref

    def step(self, energy: ChunkEnergy, actions: Actions, state, key: Key):
        inner_state, ref = state
        proposal, inner_state, n = self.inner.step(energy, actions, inner_state, key)
        if ref is None:
            ref = jnp.linalg.norm(actions)
        max_norm = self.clip_frac.astype(actions.dtype) * ref.astype(actions.dtype)
        step_norm = jnp.linalg.norm(proposal - actions)
        safe = jnp.where(step_norm > 0, step_norm, 1)
        scale = jnp.where(step_norm > max_norm, max_norm / safe, 1)
        return scale_step(actions, proposal, scale), (inner_state, state[1]), n


def _check_first_or_mask(owner: str, first: Array | None, mask: Array | None, hint: str):
    if (first is None) == (mask is None):
        raise ValueError(f"Give exactly one of `first` (an int >= 1) or `mask` to {owner}.")
    if first is not None:
        f = concrete(first)
        if first.shape != () or (f is not None and f < 1):
            shown = f if f is not None else shape_str(first)
            raise ValueError(f"`first` must be an integer >= 1 ({hint}); got {shown}.")
    if mask is not None:
        if mask.ndim != 1:
            raise ValueError(f"`mask` must be a 1-d boolean array; got shape {shape_str(mask)}.")
        m = concrete(mask)
        if m is not None and not m.any():
            raise ValueError(
                "`mask` is all False, so nothing would ever be corrected; set at least one "
                "entry True, or use Repeat(..., num_steps=0) to switch correction off."
            )


def _axis_mask(
    owner: str, first: Array | None, mask: Array | None, actions: Actions, axis: int
) -> Array:
    """The boolean mask over one axis of the chunk, shaped to broadcast against it."""
    size = actions.shape[axis]
    if mask is None:
        out = jnp.arange(size) < first
    elif mask.shape != (size,):
        raise ValueError(
            f"{owner} `mask` has shape {shape_str(mask)} but the actions have shape "
            f"{shape_str(actions)}; the mask needs shape ({size},)."
        )
    else:
        out = mask
    return out[:, None] if axis == 0 else out[None, :]


def _masked_step(inner: AbstractCorrector, mask: Array, energy, actions: Actions, state, key):
    proposal, state, n = inner.step(energy, actions, state, key)
    return jnp.where(mask, proposal, actions), state, n


class HorizonMask(AbstractCorrector[Any]):
    """Lets `inner` change only some steps of the horizon; the rest stay bit-identical.

    Give exactly one of `first` or `mask`.

    **Arguments:**

    - `inner`: the corrector to restrict.
    - `first`: correct only the first `first` actions of the chunk (`first=1`: only
        the action executed next). An integer `>= 1`; stored as an array, so changing
        it does not recompile.
    - `mask`: a boolean array of shape `(horizon,)`, `True` where actions may change.
    """

    inner: AbstractCorrector
    first: Int[Array, ""] | None
    mask: Bool[Array, " horizon"] | None

    def __init__(self, inner: AbstractCorrector, *, first: Any = None, mask: Any = None):
        self.inner = inner
        self.first = None if first is None else jnp.asarray(first, dtype=jnp.int32)
        self.mask = None if mask is None else jnp.asarray(mask, dtype=bool)

    def __check_init__(self):
        hint = "1 corrects the next action only"
        _check_first_or_mask("HorizonMask", self.first, self.mask, hint)

    def init(self, energy: ChunkEnergy, actions: Actions):
        _axis_mask("HorizonMask", self.first, self.mask, actions, axis=0)
        return self.inner.init(energy, actions)

    def step(self, energy: ChunkEnergy, actions: Actions, state, key: Key):
        mask = _axis_mask("HorizonMask", self.first, self.mask, actions, axis=0)
        return _masked_step(self.inner, mask, energy, actions, state, key)


class ActionDimMask(AbstractCorrector[Any]):
    """Lets `inner` change only some action dimensions; the rest stay bit-identical.

    openpi pads actions to 32 dimensions while a LIBERO arm uses the first 7: use
    `ActionDimMask(inner, first=7)`. Give exactly one of `first` or `mask`.

    **Arguments:**

    - `inner`: the corrector to restrict.
    - `first`: correct only the first `first` action dimensions, an integer `>= 1`.
    - `mask`: a boolean array of shape `(action_dim,)`, `True` where actions may change.
    """

    inner: AbstractCorrector
    first: Int[Array, ""] | None
    mask: Bool[Array, " action_dim"] | None

    def __init__(self, inner: AbstractCorrector, *, first: Any = None, mask: Any = None):
        self.inner = inner
        self.first = None if first is None else jnp.asarray(first, dtype=jnp.int32)
        self.mask = None if mask is None else jnp.asarray(mask, dtype=bool)

    def __check_init__(self):
        hint = "7 for LIBERO's arm in openpi's 32 padded dims"
        _check_first_or_mask("ActionDimMask", self.first, self.mask, hint)

    def init(self, energy: ChunkEnergy, actions: Actions):
        _axis_mask("ActionDimMask", self.first, self.mask, actions, axis=1)
        return self.inner.init(energy, actions)

    def step(self, energy: ChunkEnergy, actions: Actions, state, key: Key):
        mask = _axis_mask("ActionDimMask", self.first, self.mask, actions, axis=1)
        return _masked_step(self.inner, mask, energy, actions, state, key)


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
    max_halvings: int = eqx.field(static=True, default=4)

    def __check_init__(self):
        if not (isinstance(self.max_halvings, int) and self.max_halvings >= 0):
            raise ValueError(f"`max_halvings` must be an int >= 0; got {self.max_halvings!r}.")

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
            candidate = scale_step(actions, proposal, jnp.exp2(-j.astype(actions.dtype)))
            return j + 1, energy(candidate) <= e0, candidate

        init = (jnp.asarray(0, jnp.int32), jnp.array(False), actions)
        _, accepted, candidate = jax.lax.while_loop(cond, body, init)
        out = jnp.where(accepted, candidate, actions)
        state = jax.tree.map(lambda new, old: jnp.where(accepted, new, old), new_state, state)
        return out, state, jnp.where(accepted, n, 0)


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

    def __init__(self, low: Any, high: Any):
        self.low = float_array(low)
        self.high = float_array(high)

    def __check_init__(self):
        check_bounds(self.low, self.high)

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

    def __check_init__(self):
        if not (isinstance(self.num_steps, int) and self.num_steps >= 0):
            raise ValueError(
                f"`num_steps` must be an int >= 0 (0 = off, 1-3 real-time, 5-10 stronger); "
                f"got {self.num_steps!r}."
            )

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
        self.correctors = tuple(correctors)  # type: ignore[arg-type]

    def __check_init__(self):
        if not self.correctors:
            raise ValueError("Chain needs at least one corrector.")
        for i, c in enumerate(self.correctors):
            if not isinstance(c, AbstractCorrector):
                raise ValueError(
                    f"Chain element {i} is a {type(c).__name__}, not a corrector "
                    "(an AbstractCorrector such as GradientStep)."
                )

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
