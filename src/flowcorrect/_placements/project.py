"""Projection of the finished chunk onto a constraint: the guarantee."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PyTree

from .._constraints.base import AbstractConstraint, check_constraint
from .._flow.flow import BatchChunks, BatchKeys, Flow, all_finite, per_sample, sample_norms
from .._flow.integrate import integrate
from .._misc import accumulation_dtype
from .base import AbstractPlacement, check_placement, step_energy_of
from .plain import Plain


class ProjectInfo(eqx.Module):
    """Diagnostics of [`flowcorrect.Project`][], per sample.

    **Attributes:**

    - `violation_before`: the violation of the chunk the inner placement produced.
    - `violation_after`: the violation of the returned chunk (0 to the tolerance).
    - `distance`: how far the projection moved the chunk, `||out - in||` (Frobenius
        norm over the chunk, in the chunk's units).
    - `feasible`: whether the returned chunk is feasible to the constraint's tolerance.
    - `fell_back`: `True` where the inner placement's chunk was not finite, so the
        plain policy's chunk from the same noise was projected instead.
    - `kept`: `True` where the projection's output was not finite, so the (finite)
        chunk before it was returned, unprojected; `feasible` then says whether it was.
    - `inner`: the inner placement's diagnostics.
    """

    violation_before: Float[Array, " batch"]
    violation_after: Float[Array, " batch"]
    distance: Float[Array, " batch"]
    feasible: Bool[Array, " batch"]
    fell_back: Bool[Array, " batch"]
    kept: Bool[Array, " batch"]
    inner: PyTree[Any]

    @property
    def step_energy(self) -> Float[Array, "batch num_steps"] | None:
        """The inner placement's step energies (before the projection), or `None`."""
        return step_energy_of(self.inner)


class Project(AbstractPlacement):
    """Projects the chunk that another placement produced onto a constraint.

    The chunk leaves feasible (to the constraint's tolerance), moved as little as the
    constraint's projection moves it, with how far in the diagnostics. Inside the flow,
    guide by the violation so that the projection has little left to do:
    `fc.Project(c, fc.Guided())` with `energy=fc.constraints.ViolationEnergy(c)`.

    Nothing non-finite leaves: where the inner placement's chunk is not finite, the
    plain policy's chunk from the same noise (the first candidate's, for best-of-N) is
    projected instead, flagged in `fell_back`; where the projection returns a non-finite
    chunk, the chunk before it is returned, flagged in `kept`. If the policy itself
    returns a non-finite chunk, it is handed on and [`flowcorrect.sample`][] flags it.

    **Arguments:**

    - `constraint`: any [`flowcorrect.constraints.AbstractConstraint`][], in the policy's action
        space (wrap it in [`flowcorrect.constraints.InRobotSpace`][] for limits in robot units).
    - `inner`: the placement that produces the chunk; defaults to
        [`flowcorrect.Plain`][].

    !!! example

        ```python
        fcc = fc.constraints
        limits = fcc.AllOf(fcc.Box(-1.0, 1.0), fcc.MaxStepChange(0.1))
        actions, info = fc.sample(policy, observation, key, placement=fc.Project(limits))
        print(info.placement.violation_after, info.placement.distance)
        ```
    """

    constraint: AbstractConstraint
    inner: AbstractPlacement

    def __init__(self, constraint: AbstractConstraint, inner: AbstractPlacement = Plain()):
        # Checked before the fields are set: older jaxtyping (openpi's 0.2.36)
        # type-checks the fields first, with a vaguer message.
        check_constraint(constraint, "Project `constraint`")
        check_placement(inner, "Project `inner`")
        self.constraint = constraint
        self.inner = inner

    @property
    def needs_energy(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.needs_energy

    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        return self.inner.noise_shape(chunk_shape)

    def sample(self, flow: Flow, noise: Array, keys: BatchKeys) -> tuple[BatchChunks, ProjectInfo]:
        x, inner_info = self.inner.sample(flow, noise, keys)
        dtype = x.dtype
        finite_in = all_finite(x)
        batch = flow.batch_size
        first_noise = noise.reshape(batch, -1, *x.shape[1:])[:, 0].astype(dtype)
        # A real branch at batch level: the plain flow runs only when some sample needs it.
        plain = jax.lax.cond(
            jnp.all(finite_in),
            lambda: jnp.zeros_like(x),
            lambda: integrate(flow, Plain(), first_noise, keys)[0].astype(dtype),
        )
        x = jnp.where(per_sample(finite_in, x), x, plain)
        out = jax.vmap(self.constraint.project)(x).astype(dtype)
        acc = accumulation_dtype(dtype)
        kept = jnp.logical_not(all_finite(out)) & all_finite(x)
        out = jnp.where(per_sample(kept, out), x, out)
        info = ProjectInfo(
            violation_before=jax.vmap(self.constraint.violation)(x),
            violation_after=jax.vmap(self.constraint.violation)(out),
            distance=sample_norms(out.astype(acc) - x.astype(acc)),
            feasible=jax.vmap(self.constraint.is_feasible)(out),
            fell_back=jnp.logical_not(finite_in),
            kept=kept,
            inner=inner_info,
        )
        return out, info


__all__ = ["Project", "ProjectInfo"]
