"""The flow sampler: fixed-step Euler on a policy, with a placed correction."""

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PyTree

from ._correct import check_batched_context, check_key
from ._custom_types import Key, RealLike
from ._energy import EnergyFn, as_energy
from ._flow.flow import Flow, VmappedPolicy, all_finite, energy_needed, per_sample, sample_norms
from ._flow.integrate import integrate
from ._misc import count, float_array, shape_str
from ._placements.base import AbstractPlacement, check_placement, step_energy_of
from ._placements.plain import Plain
from ._policy import AbstractBatchedPolicy, AbstractPolicy


class SampleInfo(eqx.Module):
    """Diagnostics of [`flowcorrect.sample`][]. For a batch, every array has a leading
    batch axis; for one observation of a per-sample policy, none.

    **Attributes:**

    - `final_energy`: the energy of the returned chunk; `None` without an energy.
    - `fell_back`: `True` where the placement's chunk (or its energy) was not finite,
        so the plain sampler's chunk from the same noise was returned instead. If the
        policy itself returns non-finite chunks, they are returned, flagged here.
    - `uncorrected`: the plain sampler's chunk from the same noise (for best-of-N, the
        first candidate's noise); `None` unless `track_uncorrected=True`.
    - `uncorrected_energy`: its energy (`None` likewise, or without an energy).
    - `delta_norm`: `||actions - uncorrected||`, Frobenius norm over the chunk (`None`
        likewise).
    - `placement`: the placement's own diagnostics (e.g.
        [`flowcorrect.PostHocInfo`][], [`flowcorrect.BestOfNInfo`][],
        [`flowcorrect.InterleavedInfo`][], which `Plain()` gives too).
    - `step_energy`: `(*batch, num_steps)`, the energy of the denoised estimate at each
        flow step along the returned chunk's path, whatever the placement and however
        deep its inner placements (for [`flowcorrect.RealTimeChunking`][], its own RTC
        energy); `None` unless `step_energies=True` and there is an energy. Where
        `fell_back` is set, it describes the placement's chunk, not the fallback.
    """

    final_energy: Float[Array, "*batch"] | None
    fell_back: Bool[Array, "*batch"]
    uncorrected: Float[Array, "*batch horizon action_dim"] | None
    uncorrected_energy: Float[Array, "*batch"] | None
    delta_norm: Float[Array, "*batch"] | None
    placement: PyTree[Any]
    step_energy: Float[Array, "*batch num_steps"] | None


# The default placement. It is the plain Euler step like any `Plain()`; being this very
# object also says that no placement was chosen, so that an energy given without one is
# an error rather than a silent no-op.
PLAIN = Plain()

_PLACEMENTS = (
    "fc.BestOfN(8) (rank candidates by the energy), fc.Guided(...) (guidance through "
    "the velocity), fc.Denoised(corrector, ...) (correct the denoised estimate inside the "
    "flow), fc.PostHoc(corrector) (the reference's gradient steps after the flow; they "
    "lowered task success in every closed-loop test here), fc.Plain() (record energies only)"
)


def _policy_and_batch(
    policy: Any, observation: Any, noise: Any, batch_size: Any, placement: AbstractPlacement
) -> tuple[AbstractBatchedPolicy, Any, bool]:
    """The policy as a batched one, its conditioning, and whether the call is batched."""
    if isinstance(policy, AbstractBatchedPolicy):
        cond = policy.condition(observation)
        size = policy.batch_size(cond)
        if batch_size is not None and batch_size != size:
            raise ValueError(
                f"`batch_size` {batch_size} does not match the batch of {size} observations "
                f"the policy {type(policy).__name__} read."
            )
        return policy, cond, True
    if not isinstance(policy, AbstractPolicy):
        hint = ""
        if callable(policy):
            hint = (
                " For a bare velocity function velocity(observation, x_t, t), wrap it: "
                "fc.VelocityPolicy(velocity, chunk_shape=(horizon, action_dim))."
            )
        raise TypeError(
            "`policy` must be an fc.AbstractPolicy or fc.AbstractBatchedPolicy; got "
            f"{type(policy).__name__}.{hint}"
        )
    per_noise = len(placement.noise_shape(policy.chunk_shape))
    if noise is not None:
        batched = noise.ndim == per_noise + 1
        size = noise.shape[0] if batched else 1
        if batched and batch_size is not None and batch_size != size:
            raise ValueError(
                f"`batch_size` {batch_size} does not match the noise's batch axis {size}."
            )
    else:
        batched = batch_size is not None
        size = batch_size if batched else 1
    if batched:
        size = count("fc.sample", "batch_size", size, 1, "8", "samples to draw")
        check_batched_context(observation, size, "observation")
    vmapped = VmappedPolicy(policy, size, 0 if batched else None)
    return vmapped, vmapped.condition(observation), batched


def _check_noise(noise: Any, per_sample_shape: tuple[int, ...], batched_policy: bool) -> None:
    if not isinstance(noise, jax.Array | np.ndarray):
        raise TypeError(
            f"`noise` must be a JAX or NumPy array of shape {per_sample_shape} (with a leading "
            f"batch axis for a batch); got {type(noise).__name__}. Convert it with jnp.asarray."
        )
    if not jnp.issubdtype(noise.dtype, jnp.floating):
        raise ValueError(f"`noise` must be floating point; got dtype {noise.dtype}.")
    shapes = [(None, *per_sample_shape)] if batched_policy else [per_sample_shape]
    if not batched_policy:
        shapes.append((None, *per_sample_shape))
    ok = any(
        len(s) == noise.ndim and all(a is None or a == b for a, b in zip(s, noise.shape))
        for s in shapes
    )
    if not ok:
        expected = " or ".join(str(s).replace("None", "batch") for s in shapes)
        raise ValueError(
            f"`noise` must have shape {expected} for this policy and placement (best-of-N adds "
            f"an axis of n candidates); got {shape_str(noise)}."
        )


def sample(
    policy: AbstractPolicy | AbstractBatchedPolicy,
    observation: PyTree[Any],
    key: Key | None = None,
    *,
    noise: Float[Array, "*batch horizon action_dim"] | np.ndarray | None = None,
    batch_size: int | None = None,
    num_steps: int = 10,
    noise_scale: RealLike = 1.0,
    placement: AbstractPlacement | None = PLAIN,  # None: deprecated, Plain()
    energy: EnergyFn | None = None,
    step_energies: bool = False,
    track_uncorrected: bool = False,
) -> tuple[Float[Array, "*batch horizon action_dim"], SampleInfo]:
    """Samples action chunks from a flow-matching policy, with a placed correction.

    Fixed-step explicit Euler from noise to actions, `num_steps` steps in one
    `lax.scan`, compiled once per configuration (`eqx.filter_jit`). The policy's
    once-per-observation pass runs once, inside the compiled function, and the energy
    reads its context from that same pass. With the default `Plain()` this is exactly the
    plain Euler loop (openpi's `sample_actions` for an openpi policy). Every placement
    keeps the robot safe: a sample whose chunk (or its energy) is not finite is
    replaced by the plain sampler's chunk from the same noise, flagged in
    `info.fell_back`.

    **Arguments:**

    - `policy`: an [`flowcorrect.AbstractPolicy`][] (written per sample, vmapped here)
        or an [`flowcorrect.AbstractBatchedPolicy`][] (runs on the batch itself). Its
        weights are traced, so new weights do not recompile. A bare velocity function
        goes through [`flowcorrect.VelocityPolicy`][].
    - `observation`: what the policy's `condition` reads: one observation, or for a
        per-sample policy a batch (every array with a leading batch axis, with
        `batch_size` or batched `noise`); a batched policy always reads a batch.
    - `key`: a PRNG key: draws the noise when `noise` is not given, and drives
        stochastic correctors. Split per sample for a batch,
        `jax.random.split(key, batch)`.
    - `noise`: the starting noise instead of drawing it: `(horizon, action_dim)`, or
        `(batch, horizon, action_dim)`; best-of-N adds an axis of `n` candidates before
        the chunk's axes.
    - `batch_size`: for a per-sample policy, draw this many samples for a batched
        `observation`.
    - `num_steps`: the number of Euler steps (openpi's default is 10). Static.
    - `noise_scale`: multiplies the initial noise (a lower "temperature": 0.5 or 0.25
        sample nearer the policy's modes). Traced: new values do not recompile.
    - `placement`: where a correction goes; see [`flowcorrect.AbstractPlacement`][].
        The default is [`flowcorrect.Plain`][], the policy on its own; an `energy`
        given without choosing a placement is an error (pass `placement=fc.Plain()`
        to only score the plain chunks). One whose `needs_energy` is true is refused
        without an `energy`.
    - `energy`: any [`flowcorrect.EnergyFn`][], read by the placement; its context is
        the policy's `energy_context` (encoded once per observation), or bind one with
        [`flowcorrect.bind`][]. An energy without a placement is an error.
    - `step_energies`: record the energy of the denoised estimate at every flow step
        (in `info.step_energy`). Costs one energy evaluation per step. Static.
    - `track_uncorrected`: also integrate the plain flow from the same noise for
        `info.uncorrected` and `info.delta_norm` (one more policy pass per step; off by
        default; the fallback needs no tracking: it recomputes the plain chunk only
        when some sample is not finite). Static.

    **Returns:**

    `(actions, info)`: the chunk(s), `(horizon, action_dim)` or `(batch, horizon,
    action_dim)`, and a [`flowcorrect.SampleInfo`][].

    !!! example

        ```python
        import flowcorrect as fc

        actions, info = fc.sample(policy, observation, key, energy=energy,
                                  placement=fc.BestOfN(8))
        print(info.final_energy, info.placement.selected)
        ```
    """
    num_steps = count("fc.sample", "num_steps", num_steps, 1, "10", "openpi uses 10")
    if placement is None:
        warnings.warn(
            "fc.sample(placement=None) is the default placement, fc.Plain(); `None` is "
            "kept for one release: leave the argument out.",
            DeprecationWarning,
            stacklevel=2,
        )
        placement = PLAIN
    if placement is PLAIN and energy is not None:
        raise ValueError(
            "`energy` was given without a `placement`, so nothing would use it. Choose "
            f"where the correction goes: {_PLACEMENTS}."
        )
    check_placement(placement)
    if energy is None and placement.needs_energy:
        raise ValueError(energy_needed(type(placement).__name__))
    if isinstance(policy, AbstractPolicy | AbstractBatchedPolicy):
        # Once before tracing, so that a placement's checks of values it holds as
        # arrays raise plain errors here; under the trace those values are unknown.
        placement.noise_shape(tuple(policy.chunk_shape))
    if noise is not None and not isinstance(noise, jax.Array | np.ndarray):
        raise TypeError(
            "`noise` must be a JAX or NumPy array of shape (horizon, action_dim), with a "
            f"leading batch axis for a batch; got {type(noise).__name__}. Convert it with "
            "jnp.asarray."
        )
    if not isinstance(noise_scale, jax.Array):
        noise_scale = float_array(noise_scale)
    if noise_scale.shape != ():
        raise ValueError(f"`noise_scale` must be a scalar; got shape {shape_str(noise_scale)}.")
    return _sample(
        policy,
        observation,
        key,
        noise,
        batch_size,
        num_steps,
        noise_scale,
        placement,
        None if energy is None else as_energy(energy),
        bool(step_energies),
        bool(track_uncorrected),
    )


@eqx.filter_jit
def _sample(
    policy,
    observation,
    key,
    noise,
    batch_size,
    num_steps,
    noise_scale,
    placement,
    energy,
    step_energies,
    track_uncorrected,
):
    batched_policy, cond, batched = _policy_and_batch(
        policy, observation, noise, batch_size, placement
    )
    batch = batched_policy.batch_size(cond)
    chunk_shape = tuple(batched_policy.chunk_shape)
    per_noise = placement.noise_shape(chunk_shape)  # type: ignore[arg-type]
    if noise is not None:
        _check_noise(noise, per_noise, isinstance(policy, AbstractBatchedPolicy))
        if batched and noise.shape[0] != batch:
            raise ValueError(
                f"`noise` has a batch axis of {noise.shape[0]} but the policy read {batch} "
                "observations."
            )
        if not batched:
            noise = noise[None]
        dtype = noise.dtype
        if key is None:
            key = jax.random.key(0)
    elif key is None:
        raise ValueError("Give `key` (to draw the noise) or `noise`.")
    else:
        dtype = jnp.result_type(float)
    key = check_key(key, None, "fc.sample")
    keys = jax.random.split(key, batch) if batched else key[None]
    noise_keys, run_keys = jnp.swapaxes(jax.vmap(jax.random.split)(keys), 0, 1)
    if noise is None:
        noise = jax.vmap(lambda k: jax.random.normal(k, per_noise, dtype))(noise_keys)
    x0 = (noise * noise_scale.astype(dtype)).astype(dtype)

    encoded = None
    if energy is not None:
        context = batched_policy.energy_context(cond)
        check_batched_context(context, batch, "the policy's energy_context")
        encoded = jax.vmap(energy.encode, axis_size=batch)(context)
    flow = Flow(batched_policy, cond, energy, encoded, batch, num_steps, step_energies)

    actions, placement_info = placement.sample(flow, x0, run_keys)
    step_energy = step_energy_of(placement_info)
    if step_energy is not None and getattr(step_energy, "shape", None) != (batch, num_steps):
        raise ValueError(
            f"The placement {type(placement).__name__} returned diagnostics whose "
            f"`step_energy` has shape {shape_str(step_energy)}; expected "
            f"{(batch, num_steps)} (one energy per sample and flow step) or None."
        )
    if getattr(actions, "shape", None) != (batch, *chunk_shape):
        raise ValueError(
            f"The placement {type(placement).__name__} returned chunks of shape "
            f"{shape_str(actions)}; expected {(batch, *chunk_shape)}."
        )
    actions = actions.astype(dtype)

    final_energy = None if energy is None else flow.energies(actions)
    ok = all_finite(actions)
    if final_energy is not None:
        ok = ok & jnp.isfinite(final_energy)
    first_noise = x0.reshape(batch, -1, *chunk_shape)[:, 0]
    uncorrected = uncorrected_energy = delta_norm = None
    if type(placement) is Plain:
        # The plain chunk is its own fallback: nothing safer to put in its place, but a
        # chunk that is not finite is still reported.
        fell_back = jnp.logical_not(ok)
        if track_uncorrected:
            uncorrected, uncorrected_energy = actions, final_energy
            delta_norm = jnp.zeros(batch, actions.dtype)
    else:
        if track_uncorrected:
            plain = integrate(flow, Plain(), first_noise, run_keys)[0]
        else:
            # A real branch at batch level: the plain flow runs only if some sample
            # needs its fallback.
            plain = jax.lax.cond(
                jnp.all(ok),
                lambda: jnp.zeros_like(first_noise),
                lambda: integrate(flow, Plain(), first_noise, run_keys)[0],
            )
        actions = jnp.where(per_sample(ok, actions), actions, plain)
        fell_back = jnp.logical_not(ok)
        if final_energy is not None:
            plain_energy = flow.energies(plain) if track_uncorrected else None
            if plain_energy is None:
                plain_energy = jax.lax.cond(
                    jnp.all(ok),
                    lambda: jnp.zeros_like(final_energy),
                    lambda: flow.energies(plain),
                )
            final_energy = jnp.where(ok, final_energy, plain_energy)
            if track_uncorrected:
                uncorrected_energy = plain_energy
        if track_uncorrected:
            uncorrected = plain
            delta_norm = sample_norms(actions - plain)
    info = SampleInfo(final_energy, fell_back, uncorrected, uncorrected_energy, delta_norm,
                      placement_info, step_energy)
    if not batched:
        actions, info = jax.tree.map(lambda a: a[0], (actions, info))
    return actions, info
