"""`Flow`: a batch of observations through a policy, as a placement sees it."""

import dataclasses
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .._conventions import AbstractConvention
from .._correct import CorrectionInfo, correct_single
from .._correctors.base import AbstractCorrector
from .._custom_types import Encoded, Scalar
from .._energy import AbstractEnergy, ChunkFn
from .._misc import safe_norm
from .._policy import AbstractBatchedPolicy, AbstractPolicy, Conditioning, check_velocity_output

BatchChunks = Float[Array, "batch horizon action_dim"]
BatchKeys = Any  # a PRNG key array of shape (batch,)


class VmappedPolicy(AbstractBatchedPolicy):
    """A per-sample [`flowcorrect.AbstractPolicy`][] run on a batch with `jax.vmap`.

    `observation_axis` is `0` for a batched observation and `None` for one observation
    shared by a batch of size `size` (an unbatched call, `size = 1`).
    """

    policy: AbstractPolicy
    size: int = eqx.field(static=True)
    observation_axis: int | None = eqx.field(static=True)

    @property
    def chunk_shape(self) -> tuple[int, int]:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.policy.chunk_shape

    @property
    def convention(self) -> AbstractConvention:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.policy.convention

    # One observation runs without `vmap`: the compiled program is then the policy's own,
    # so a plain call reproduces a hand-written loop bit for bit on every jax version.
    def condition(self, observations: Any) -> Conditioning:
        if self.size == 1 and self.observation_axis is None:
            return _add_axis(self.policy.condition(observations))
        return jax.vmap(
            self.policy.condition, in_axes=(self.observation_axis,), axis_size=self.size
        )(observations)

    def batch_size(self, cond: Conditioning) -> int:
        return self.size

    # `t` may hold one time per action token for a policy that declares
    # `accepts_token_time` (training-time real-time chunking); it is shared by the batch.
    def velocity(
        self, cond: Conditioning, x_t: BatchChunks, t: Scalar | Float[Array, " horizon"]
    ) -> BatchChunks:
        def one(cond, x, t):
            return check_velocity_output(self.policy.velocity(cond, x, t), x)

        if x_t.shape[0] == 1:
            return one(_drop_axis(cond), x_t[0], t)[None]
        return jax.vmap(one, in_axes=(0, 0, None))(cond, x_t, t)

    def energy_context(self, cond: Conditioning) -> Any:
        if self.size == 1:
            return _add_axis(self.policy.energy_context(_drop_axis(cond)))
        return jax.vmap(self.policy.energy_context, axis_size=self.size)(cond)

    def repeat(self, cond: Conditioning, n: int) -> Conditioning:
        return jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), cond)


def _add_axis(tree: Any) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)


def _drop_axis(tree: Any) -> Any:
    return jax.tree.map(lambda a: a[0], tree)


def all_finite(x: Array) -> Bool[Array, " batch"]:
    """Per sample: whether every entry of the sample is finite."""
    return jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)


def sample_norms(x: Array) -> Float[Array, " batch"]:
    """Per-sample Frobenius norms that cannot overflow (see `safe_norm`)."""
    return jax.vmap(safe_norm)(x)


def per_sample(mask: Array, x: Array) -> Array:
    """A per-sample value `(batch,)` shaped to broadcast against a batch of chunks `x`."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def energy_needed(who: str) -> str:
    """The message refusing a placement `who` that needs an energy and has none."""
    return (
        f"The {who} placement needs an energy: pass energy=... to fc.sample (a learned "
        "fc.EnergyModel, a hand-written energy such as fc.SquaredDistance, or any callable "
        "energy(context, actions) -> scalar), or choose a placement that needs none "
        "(fc.Plain(), fc.BestOfN(n, select=fc.Medoid()), fc.RealTimeChunking(...))."
    )


class Flow(eqx.Module):
    """A batch of observations through a policy: what a placement works with.

    Built by [`flowcorrect.sample`][] after the policy's once-per-observation pass;
    placements call its methods. Every array has a leading batch axis: the chunks `x`
    are `(batch, horizon, action_dim)`; energies, norms and flags are `(batch,)`; keys
    are one per sample. Energies and correctors run per sample (vmapped); the velocity
    runs on the whole batch, as the policy does.

    **Attributes:**

    - `policy`: the policy, batched ([`flowcorrect.AbstractBatchedPolicy`][]; a
        per-sample policy is vmapped).
    - `cond`: what the policy's `condition` (its once-per-observation pass) returned.
    - `energy`: the energy, or `None` when `sample` was given none.
    - `encoded`: the energy's encoded context per sample, or `None`.
    - `batch_size`, `num_steps`: static ints.
    - `step_energies`: whether the Euler loop records the energy of the denoised
        estimate at every step.
    """

    policy: AbstractBatchedPolicy
    cond: Conditioning
    energy: AbstractEnergy | None
    encoded: Encoded
    batch_size: int = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)
    step_energies: bool = eqx.field(static=True)

    @property
    def convention(self) -> AbstractConvention:
        """The policy's time convention."""
        return self.policy.convention

    @property
    def prefix(self) -> Conditioning:
        """Deprecated: `cond`."""
        warnings.warn(
            "Flow.prefix is now Flow.cond (what the policy's `condition` returned; "
            "`prefix` is kept for one release).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.cond

    def velocity(self, x: BatchChunks, t: Scalar | Float[Array, " horizon"]) -> BatchChunks:
        """The policy's velocity for every chunk of the batch at flow time `t` (a scalar,
        or one time per action token for a policy with `accepts_token_time`)."""
        return check_velocity_output(self.policy.velocity(self.cond, x, t), x)

    def denoised(self, x: BatchChunks, v: BatchChunks, t: Scalar) -> BatchChunks:
        """The denoised (clean-action) estimate read off `x_t` and its velocity."""
        return self.convention.denoised(x, v, t)

    def require_energy(self, who: str) -> AbstractEnergy:
        """The energy; a clear error naming `who` needs it when there is none."""
        if self.energy is None:
            raise ValueError(energy_needed(who))
        return self.energy

    def energies(self, actions: BatchChunks, who: str = "this") -> Float[Array, " batch"]:
        """The energy of every chunk of the batch at its own observation."""
        energy = self.require_energy(who)
        return jax.vmap(lambda enc, a: ChunkFn(energy, enc)(a))(self.encoded, actions)

    def energy_and_grad(
        self, actions: BatchChunks, who: str = "this"
    ) -> tuple[Float[Array, " batch"], BatchChunks]:
        """The energy of every chunk and its gradient with respect to the chunk."""
        energy = self.require_energy(who)
        return jax.vmap(lambda enc, a: jax.value_and_grad(ChunkFn(energy, enc))(a))(
            self.encoded, actions
        )

    def correct(
        self, actions: BatchChunks, corrector: AbstractCorrector, keys: BatchKeys, who: str = "this"
    ) -> tuple[BatchChunks, CorrectionInfo]:
        """Runs `corrector` on every chunk at its own observation, keeping the incoming
        chunk (flagged) wherever the result is not finite; see [`flowcorrect.correct`][]."""
        energy = self.require_energy(who)
        return jax.vmap(lambda enc, a, k: correct_single(energy, enc, a, corrector, k))(
            self.encoded, actions, keys
        )

    def repeat(self, n: int) -> "Flow":
        """The flow of a batch in which each observation appears `n` times in a row (the
        conditioning and the energy's encoding are shared, not recomputed)."""
        return dataclasses.replace(
            self,
            cond=self.policy.repeat(self.cond, n),
            encoded=jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), self.encoded),
            batch_size=self.batch_size * n,
        )

    def with_energy(self, energy: AbstractEnergy | None, encoded: Encoded) -> "Flow":
        """The same batch through the same policy, read by another energy: `encoded` is
        that energy's encoded context per sample (a leading batch axis)."""
        return dataclasses.replace(self, energy=energy, encoded=encoded)


def split_keys(keys: BatchKeys, n: int) -> tuple[BatchKeys, ...]:
    """Splits each sample's key in `n`: a tuple of `n` key arrays of shape `(batch,)`."""
    split = jax.vmap(lambda k: jax.random.split(k, n))(keys)
    return tuple(split[:, i] for i in range(n))
