"""Energies: the protocol a user's energy satisfies and a few hand-written ones.

An energy scores one action chunk for one observation; low means plausible. Anything
callable as `energy(context, actions) -> scalar` is an energy. An energy whose cost is
dominated by work on the context alone (a learned model encoding hundreds of context
tokens) should also split into `encode(context)` and `score(encoded, actions)`: then
[`flowcorrect.sample`][] and [`flowcorrect.correct`][] encode once per observation and
every correction step only pays for `score`.
"""

import abc
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._custom_types import Actions, Context, Encoded, IndexLike, RealLike, Scalar
from ._misc import concrete, float_array, is_int, scalar_float, shape_str


@runtime_checkable
class EnergyFn(Protocol):
    """What an energy is: `energy(context, actions) -> scalar`.

    `context` is any pytree describing one observation (for a learned energy, usually
    the policy's context tokens and their padding mask); `actions` is one chunk of
    shape `(horizon, action_dim)`. The result is a scalar array: low energy means the
    chunk is plausible for the observation. Batching is done by `jax.vmap` outside.
    """

    def __call__(self, context: Context, actions: Actions, /) -> Scalar: ...


@runtime_checkable
class SplitEnergyFn(EnergyFn, Protocol):
    """An energy whose context-only work can be done once per observation.

    `energy(context, actions) == energy.score(energy.encode(context), actions)` must
    hold. The entry points use the split so that a correction of K steps
    encodes the context once, not K times.
    """

    def encode(self, context: Context, /) -> Encoded: ...

    def score(self, encoded: Encoded, actions: Actions, /) -> Scalar: ...


class AbstractEnergy(eqx.Module):
    """Base class for energies that split into `encode` and `score`.

    Subclasses implement both; calling the energy composes them. Energies without any
    context-only work implement `encode` as the identity.
    """

    @abc.abstractmethod
    def encode(self, context: Context) -> Encoded:
        """Does the work that depends on the context alone, once per observation."""

    @abc.abstractmethod
    def score(self, encoded: Encoded, actions: Actions) -> Scalar:
        """The energy of one action chunk given an encoded context."""

    def __call__(self, context: Context, actions: Actions) -> Scalar:
        return self.score(self.encode(context), actions)


class FnEnergy(AbstractEnergy):
    """An energy made of a callable `fn(context, actions) -> scalar`.

    Built by [`flowcorrect.as_energy`][] at every entry point, so any callable is an
    energy. When `fn` also has `encode` and `score` (a
    [`flowcorrect.SplitEnergyFn`][] that does not subclass
    [`flowcorrect.AbstractEnergy`][]) they are used; otherwise encoding is the identity.

    **Arguments:**

    - `fn`: the callable. A function is static to `jit` (pass the same object on every
        call); an `eqx.Module`'s arrays are traced.
    """

    fn: EnergyFn

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(
                "An energy must be callable as energy(context, actions) -> scalar; got "
                f"{type(self.fn).__name__}. Hand-written examples: fc.SquaredDistance, "
                "fc.BoundsPenalty; learned: fc.EnergyModel."
            )

    def encode(self, context: Context) -> Encoded:
        if isinstance(self.fn, SplitEnergyFn):
            return self.fn.encode(context)
        return context

    # Returns whatever `fn` does: `ChunkFn` checks it, with a message that says the fix.
    def score(self, encoded: Encoded, actions: Actions) -> Any:
        if isinstance(self.fn, SplitEnergyFn):
            return self.fn.score(encoded, actions)
        return self.fn(encoded, actions)


def as_energy(energy: EnergyFn, name: str = "energy") -> AbstractEnergy:
    """Converts any callable `energy(context, actions) -> scalar` to an energy.

    An [`flowcorrect.AbstractEnergy`][] is returned as it is; any other callable is
    wrapped in a [`flowcorrect.FnEnergy`][]. Every entry point does this with the
    energy it is given, so you rarely need to call it.

    **Arguments:**

    - `energy`: the energy.
    - `name`: the argument's name, for the error message.

    **Returns:**

    An [`flowcorrect.AbstractEnergy`][] with `encode` and `score`.
    """
    if isinstance(energy, AbstractEnergy):
        return energy
    if not callable(energy):
        raise TypeError(
            f"`{name}` must be callable as energy(context, actions) -> scalar; got "
            f"{type(energy).__name__}. Hand-written examples: fc.SquaredDistance, "
            "fc.BoundsPenalty; learned: fc.EnergyModel."
        )
    return FnEnergy(energy)


class BoundEnergy(AbstractEnergy):
    """An energy with its context fixed and encoded once; it ignores the context it is
    called with. Built by [`flowcorrect.bind`][].

    Because it is an energy again, it goes wherever an energy goes:
    `fc.correct(bound, None, actions)` corrects towards the bound context, and
    `fc.sample(..., energy=bound)` ignores the policy's context. It is a pytree (the
    encoding is a leaf), so it crosses `jax.jit` and `jax.vmap`.

    **Arguments:**

    - `energy`: the energy (an [`flowcorrect.AbstractEnergy`][]).
    - `encoded`: `energy.encode(context)`.
    """

    energy: AbstractEnergy
    encoded: Encoded

    def encode(self, context: Context) -> Encoded:
        return self.encoded

    def score(self, encoded: Encoded, actions: Actions) -> Scalar:
        return self.energy.score(encoded, actions)


def bind(energy: EnergyFn, context: Context) -> BoundEnergy:
    """Fixes the context of an energy, encoding it once.

    **Arguments:**

    - `energy`: any [`flowcorrect.EnergyFn`][].
    - `context`: the context of one observation.

    **Returns:**

    A [`flowcorrect.BoundEnergy`][]: an energy that ignores the context it is called
    with (pass `None`).

    !!! example

        ```python
        bound = fc.bind(fc.SquaredDistance(), target)
        actions, info = fc.correct(bound, None, actions)
        ```
    """
    energy = as_energy(energy)
    return BoundEnergy(energy, energy.encode(context))


class OnActionDims(AbstractEnergy):
    """An energy of some action dimensions only: the inner energy receives just those.

    openpi pads every robot's actions to 32 dimensions while a LIBERO arm uses the
    first 7; an energy trained on 7 dimensions scores `actions[:, :7]`:
    `fc.OnActionDims(energy, 7)`. The inner energy is called on a chunk of shape
    `(horizon, k)` and never sees the other dimensions, so its gradient with respect
    to them is exactly zero: gradient correctors ([`flowcorrect.GradientStep`][],
    [`flowcorrect.ClipStep`][], [`flowcorrect.Repeat`][], [`flowcorrect.Backtrack`][],
    [`flowcorrect.reference_recipe`][]) and the [`flowcorrect.Denoised`][] placement
    leave those dimensions bit for bit as they were, and [`flowcorrect.BestOfN`][]
    ranks candidates by the selected dimensions alone. (One exception: XLA on CPU
    flushes subnormal numbers, below `1.2e-38` in float32, to zero in arithmetic such
    as `a - alpha * 0.0`; a [`flowcorrect.Mask`][] keeps even those bit for bit.)

    Two things move the other dimensions anyway, by design, and take a mask:
    noise ([`flowcorrect.LangevinStep`][]) and projections
    ([`flowcorrect.ProjectBounds`][]) act on every entry, so wrap them in
    `fc.Mask(corrector, action_dims=k)`; and [`flowcorrect.Guided`][] pulls the
    gradient back through the policy's velocity, which couples all dimensions, so
    guidance changes the velocity of every dimension (the gradient of
    `E(a_hat[:, :k])` with respect to the whole `x_t`).

    **Arguments:**

    - `energy`: any [`flowcorrect.EnergyFn`][] over chunks of shape `(horizon, k)`.
    - `action_dims`: an int `k` (the first `k` dimensions), or a sequence of distinct
        non-negative dimension indices in increasing order (the chunk the energy
        receives keeps that order). Static: a new value compiles anew, as the shape
        the energy receives changes.

    !!! example

        ```python
        energy7 = fc.OnActionDims(energy, 7)          # energy: trained on (50, 7) chunks
        actions, info = fc.sample(policy, obs, key, energy=energy7,
                                  placement=fc.PostHoc(fc.reference_recipe()))
        ```
    """

    energy: AbstractEnergy
    action_dims: int | tuple[int, ...] = eqx.field(static=True)

    def __init__(self, energy: EnergyFn, action_dims: IndexLike):
        self.energy = as_energy(energy)
        if is_int(action_dims):
            self.action_dims = int(action_dims)
        elif isinstance(action_dims, Sequence | np.ndarray) and not isinstance(
            action_dims, str
        ):
            self.action_dims = tuple(
                int(d) if is_int(d) else d
                for d in np.asarray(action_dims).tolist()
            )
        else:
            self.action_dims = action_dims

    def __check_init__(self):
        dims = self.action_dims
        if is_int(dims):
            if dims < 1:
                raise ValueError(
                    f"OnActionDims `action_dims` must be >= 1 (the first k dimensions, "
                    f"e.g. 7 for LIBERO in openpi's 32); got {dims}."
                )
            return
        if not isinstance(dims, tuple) or not all(
            is_int(d) for d in dims
        ):
            raise TypeError(
                "OnActionDims `action_dims` must be an int k (the first k dimensions) or a "
                f"sequence of int dimension indices; got {dims!r}. A boolean mask m is "
                "np.flatnonzero(m)."
            )
        if len(dims) == 0:
            raise ValueError(
                "OnActionDims `action_dims` is empty; give at least one dimension index."
            )
        if min(dims) < 0 or any(b <= a for a, b in zip(dims, dims[1:])):
            raise ValueError(
                "OnActionDims `action_dims` must be distinct non-negative indices in "
                f"increasing order; got {list(dims)}. Sort them (sorted(set(dims)))."
            )

    def _select(self, actions: Actions) -> Float[Array, "horizon selected"]:
        if not hasattr(actions, "ndim") or actions.ndim != 2:
            raise ValueError(
                "OnActionDims scores one action chunk of shape (horizon, action_dim); got "
                f"{shape_str(actions)}. Call it per sample (vmap for batches)."
            )
        action_dim = actions.shape[1]
        dims = self.action_dims
        if isinstance(dims, int):
            if dims > action_dim:
                raise ValueError(
                    f"OnActionDims selects the first {dims} action dimensions, but the "
                    f"chunk has only {action_dim} (shape {shape_str(actions)}). Use "
                    f"action_dims <= {action_dim}."
                )
            return actions[:, :dims]
        if dims[-1] >= action_dim:
            raise ValueError(
                f"OnActionDims selects action dimension {dims[-1]}, but the chunk has only "
                f"{action_dim} (shape {shape_str(actions)}); indices must be < {action_dim}."
            )
        return actions[:, np.asarray(dims)]

    def encode(self, context: Context) -> Encoded:
        return self.energy.encode(context)

    # Returns what the inner energy does: `ChunkFn` checks it, with a message that says
    # the fix.
    def score(self, encoded: Encoded, actions: Actions) -> Any:
        return self.energy.score(encoded, self._select(actions))


class ChunkFn(eqx.Module):
    """An energy at one encoded context, as a function of the chunk alone.

    This is what correctors receive as `energy` (they call `energy(actions)`); it
    checks that the energy returns a scalar.
    """

    energy: AbstractEnergy
    encoded: Encoded

    def __call__(self, actions: Actions) -> Scalar:
        out = self.energy.score(self.encoded, actions)
        if not (isinstance(out, jax.Array) and out.shape == ()):
            raise ValueError(
                "An energy must return a scalar array for one action chunk of shape "
                f"{shape_str(actions)}; got {shape_str(out)}. Reduce over the horizon "
                "inside the energy and call it on one sample (vmap for batches)."
            )
        return out


def _check_same_shape(name: str, expected: Any, actions: Actions) -> None:
    if expected.shape != actions.shape:
        raise ValueError(
            f"`{name}` has shape {shape_str(expected)} but the actions have shape "
            f"{shape_str(actions)}; they must match."
        )


class SquaredDistance(AbstractEnergy):
    """Weighted squared distance to a target chunk: `0.5 * sum(weight * (a - target)**2)`.

    **Arguments:**

    - `target`: the target chunk, shape `(horizon, action_dim)`. When `None` (the
        default), the context is the target: `energy(target, actions)`.
    - `weight`: a non-negative scalar or an array broadcastable to the chunk (per step
        and per action dimension weights). Defaults to 1.

    Its gradient is `weight * (a - target)` and its largest curvature is `max(weight)`,
    so gradient steps with `alpha < 2 / max(weight)` converge to the target.
    """

    target: Float[Array, "horizon action_dim"] | None
    weight: Float[Array, "*weight_shape"]

    def __init__(self, target: RealLike | None = None, weight: RealLike = 1.0):
        self.target = None if target is None else float_array(target)
        self.weight = float_array(weight)

    def __check_init__(self):
        if self.target is not None and self.target.ndim != 2:
            raise ValueError(
                "`target` must have shape (horizon, action_dim); got "
                f"{shape_str(self.target)}."
            )
        check_nonnegative_finite("SquaredDistance", "weight", self.weight)
        if self.target is not None and self.weight.ndim > 0:
            _check_weight_broadcasts(self.weight, self.target.shape)

    def encode(self, context: Context) -> Encoded:
        return context

    def score(self, encoded: Encoded, actions: Actions) -> Scalar:
        if self.target is None:
            if not isinstance(encoded, jax.Array | np.ndarray):
                raise TypeError(
                    "SquaredDistance() without a target reads its target chunk from the "
                    f"context, so the context must be an array of the actions' shape "
                    f"{shape_str(actions)}; got {type(encoded).__name__}. Pass the target "
                    "as the context, or fix it with SquaredDistance(target=...)."
                )
            target = encoded
        else:
            target = self.target
        _check_same_shape("target" if self.target is not None else "context", target, actions)
        _check_weight_broadcasts(self.weight, actions.shape)
        diff = actions - target.astype(actions.dtype)
        weight = jnp.broadcast_to(self.weight, diff.shape).astype(actions.dtype)
        return 0.5 * jnp.sum(weight * diff**2)


class BoundsPenalty(AbstractEnergy):
    """Squared penalty outside action bounds: zero inside `[low, high]`.

    `0.5 * weight * sum(relu(a - high)**2 + relu(low - a)**2)`; the context is ignored.

    **Arguments:**

    - `low`, `high`: scalars or arrays broadcastable to the chunk, `low <= high`.
    - `weight`: a non-negative scalar. Defaults to 1.
    """

    low: Float[Array, "*low_shape"]
    high: Float[Array, "*high_shape"]
    weight: Float[Array, ""]

    def __init__(self, low: RealLike, high: RealLike, weight: RealLike = 1.0):
        self.low = float_array(low)
        self.high = float_array(high)
        self.weight = float_array(weight)

    def __check_init__(self):
        check_bounds(self.low, self.high)
        if self.weight.shape != ():
            raise ValueError(
                f"BoundsPenalty `weight` must be a scalar; got shape {shape_str(self.weight)}. "
                "Scale the bounds per entry with arrays for `low` and `high`."
            )
        check_nonnegative_finite("BoundsPenalty", "weight", self.weight)

    def encode(self, context: Context) -> Encoded:
        return None

    def score(self, encoded: Encoded, actions: Actions) -> Scalar:
        low, high = broadcast_bounds("BoundsPenalty", self.low, self.high, actions)
        over = jnp.maximum(actions - high, 0)
        under = jnp.maximum(low - actions, 0)
        return 0.5 * self.weight.astype(actions.dtype) * jnp.sum(over**2 + under**2)


def broadcast_bounds(owner: str, low: Array, high: Array, actions: Actions) -> tuple[Array, Array]:
    """`low` and `high` broadcast to the chunk in its dtype; a clear error if they can't."""
    out = []
    for name, bound in (("low", low), ("high", high)):
        try:
            jnp.broadcast_shapes(bound.shape, actions.shape)
        except ValueError:
            raise ValueError(
                f"{owner} `{name}` has shape {shape_str(bound)}, which does not "
                f"broadcast to the actions' shape {shape_str(actions)}."
            ) from None
        out.append(jnp.broadcast_to(bound, actions.shape).astype(actions.dtype))
    return out[0], out[1]


def check_bounds(low: Array, high: Array) -> None:
    try:
        jnp.broadcast_shapes(low.shape, high.shape)
    except ValueError:
        raise ValueError(
            f"`low` {shape_str(low)} and `high` {shape_str(high)} must broadcast together."
        ) from None
    lo, hi = concrete(low), concrete(high)
    for name, value in (("low", lo), ("high", hi)):
        if value is not None and np.isnan(value).any():
            raise ValueError(
                f"Action bounds must not be NaN; `{name}` has {int(np.isnan(value).sum())} "
                "NaN entries. Use -inf or inf for an unbounded side."
            )
    if lo is not None and hi is not None and (lo > hi).any():
        raise ValueError(
            "Action bounds need `low <= high` everywhere; got low > high at "
            f"{int((lo > hi).sum())} entries. Swap or fix the bounds."
        )


class SumEnergy(AbstractEnergy):
    """A weighted sum of energies, `sum_i weights[i] * energies[i](context, actions)`.

    Every term sees the same context and is encoded once (a plain callable is made an
    energy by [`flowcorrect.as_energy`][], its encoding the identity).

    **Arguments:**

    - `energies`: a sequence of energies.
    - `weights`: one non-negative weight per energy; defaults to all ones.
    """

    energies: tuple[AbstractEnergy, ...]
    weights: Float[Array, " num_energies"]

    def __init__(self, energies: Sequence[EnergyFn], weights: RealLike | None = None):
        self.energies = tuple(as_energy(e, f"energies[{i}]") for i, e in enumerate(energies))
        n = len(self.energies)
        self.weights = float_array(jnp.ones(n) if weights is None else weights)

    def __check_init__(self):
        if len(self.energies) == 0:
            raise ValueError("`energies` is empty; give at least one energy.")
        if self.weights.shape != (len(self.energies),):
            raise ValueError(
                f"`weights` has shape {shape_str(self.weights)} but there are "
                f"{len(self.energies)} energies; give one weight per energy."
            )
        check_nonnegative_finite("SumEnergy", "weights", self.weights)

    def encode(self, context: Context) -> Encoded:
        return tuple(e.encode(context) for e in self.energies)

    def score(self, encoded: Encoded, actions: Actions) -> Scalar:
        total = jnp.zeros((), actions.dtype)
        for i, (e, enc) in enumerate(zip(self.energies, encoded, strict=True)):
            value = e.score(enc, actions)
            total = total + self.weights[i].astype(actions.dtype) * value
        return total


class Ensemble(AbstractEnergy):
    """A pessimistic ensemble: the members' mean energy plus `pessimism` times their
    spread, `mean_i E_i + pessimism * std_i E_i`.

    For ranking candidates with several learned verifiers (trained on other seeds,
    other losses or other data): a candidate the members disagree about is one none of
    them was trained to judge, and is scored as if it were worse, so the choice departs
    from what every member likes only where they agree (the lower-confidence-bound
    rule of offline RL, here on energies, where lower is better). `pessimism = 0` is
    the plain mean. The spread is the population standard deviation; its gradient is
    defined (zero) where all members agree, so guidance through an ensemble of one or
    of identical members stays finite. A member that is not finite makes the ensemble
    not finite, so [`flowcorrect.BestOfN`][] never chooses that candidate. The energy
    is computed and returned in float32 at least (float64 when a member returns
    float64), whatever the chunk's dtype, so that candidates are compared unrounded.

    **Arguments:**

    - `energies`: a sequence of at least one energy; each is encoded once per
        observation.
    - `pessimism`: the weight of the spread, a number `>= 0`; defaults to 1.

    !!! example

        ```python
        verifiers = [fc.SquaredDistance(), fc.SquaredDistance(weight=2.0)]
        energy = fc.Ensemble(verifiers, pessimism=1.0)
        placement = fc.BestOfN(8)   # ranks by the ensemble's pessimistic energy
        ```
    """

    energies: tuple[AbstractEnergy, ...]
    pessimism: Float[Array, ""]

    def __init__(self, energies: Sequence[EnergyFn], pessimism: RealLike = 1.0):
        members = tuple(as_energy(e, f"energies[{i}]") for i, e in enumerate(energies))
        pessimism = scalar_float("Ensemble", "pessimism", pessimism, "1.0")
        # Checked before the fields are set too: openpi's jaxtyping 0.2.36 type-checks
        # the fields first, with a vaguer message.
        _check_ensemble(members, pessimism)
        self.energies = members
        self.pessimism = pessimism

    def __check_init__(self):
        _check_ensemble(self.energies, self.pessimism)

    def encode(self, context: Context) -> Encoded:
        return tuple(e.encode(context) for e in self.energies)

    def score(self, encoded: Encoded, actions: Actions) -> Scalar:
        # Each member's energy is kept in its own dtype, and they are combined in float32
        # at least (float64 if a member is): rounded to a bfloat16 chunk's dtype, energies
        # near 1000 that differ in the fourth digit all become 1000.0 and every
        # candidate ties; rounded to float16, an energy of 1e6 becomes inf. The result
        # stays in that dtype, so that ranking compares the unrounded values.
        values = [jnp.asarray(e.score(enc, actions))
                  for e, enc in zip(self.energies, encoded, strict=True)]
        acc = jnp.result_type(jnp.float32, *(v.dtype for v in values))
        v = jnp.stack([x.astype(acc) for x in values])
        mean = jnp.mean(v)
        var = jnp.mean((v - mean) ** 2)
        # The double `where` keeps sqrt's infinite slope at 0 out of the gradient.
        spread = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1)), 0)
        return mean + self.pessimism.astype(acc) * spread


def _check_ensemble(energies: tuple, pessimism: Array) -> None:
    if len(energies) == 0:
        raise ValueError("`energies` is empty; give at least one energy.")
    if pessimism.shape != ():
        raise ValueError(
            f"Ensemble `pessimism` must be a scalar; got shape {shape_str(pessimism)}."
        )
    check_nonnegative_finite("Ensemble", "pessimism", pessimism)


def check_nonnegative_finite(owner: str, name: str, value: Array) -> None:
    """A clear error for a negative, NaN or infinite hyperparameter known at construction."""
    v = concrete(value)
    if v is not None and not (np.isfinite(v).all() and (v >= 0).all()):
        bad = v[~(np.isfinite(v) & (v >= 0))] if v.ndim else v
        raise ValueError(
            f"{owner} `{name}` must be finite and >= 0; got {np.ravel(bad)[:4].tolist()}."
        )


def _check_weight_broadcasts(weight: Array, shape: tuple[int, ...]) -> None:
    try:
        out = jnp.broadcast_shapes(weight.shape, tuple(shape))
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"SquaredDistance `weight` has shape {shape_str(weight)}, which does not "
            f"broadcast to the chunk's shape {tuple(shape)}; give a scalar, a per-step "
            "weight of shape (horizon, 1), a per-dimension weight of shape (action_dim,), "
            "or the chunk's shape."
        )
