"""The flow sampler: fixed-step Euler on any velocity field, with a placed correction."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._correct import CorrectionInfo, check_batched_context, correct_prepared
from .._correctors.base import AbstractCorrector
from .._correctors.recipes import reference_recipe
from .._custom_types import Actions, Context, Key, Scalar
from .._energy import BoundEnergy, EnergyFn, prepare
from .._misc import shape_str
from .conventions import AbstractConvention, OpenPI
from .placements import AbstractInterleaved, AbstractPlacement, BestOfN, Denoised, Guided, PostHoc

VelocityFn = Callable[[Context, Actions, Scalar], Actions]


class SampleInfo(eqx.Module):
    """Diagnostics of [`flowcorrect.sample`][]; every field has a leading batch axis
    for a batch. Fields that need an energy are `None` when no energy was given.

    **Attributes:**

    - `step_energy`: shape `(num_steps,)`: at each flow step, the energy of the
        denoised estimate that step's velocity gives, before that step's correction
        (for plots of energy against flow time). `None` with `step_energies=False`.
    - `final_energy`: the energy of the returned chunk.
    - `uncorrected`: the chunk the plain sampler draws from the same noise.
        `None` with `track_uncorrected=False` for an interleaved placement.
    - `uncorrected_energy`: its energy.
    - `delta_norm`: `||actions - uncorrected||`, Frobenius norm over the chunk.
    - `num_applied`: how many flow steps had an interleaved correction applied.
    - `num_skipped`: how many scheduled steps of nonzero weight had their correction
        skipped because it was not finite (the plain Euler step was taken instead).
    - `fell_back`: `True` where the corrected chunk or its energy was not finite, so
        the uncorrected chunk from the same noise was returned.
    - `post`: the [`flowcorrect.CorrectionInfo`][] of a post-hoc correction
        ([`flowcorrect.PostHoc`][], `BestOfN(then=PostHoc())`), else `None`.
    - `candidate_energy`: [`flowcorrect.BestOfN`][] only, shape `(n,)`: the final
        energy of each candidate (`inf` where not finite).
    - `selected`: [`flowcorrect.BestOfN`][] only: the index of the chosen candidate.
        For best-of-N the other fields describe the chosen candidate.
    """

    step_energy: Float[Array, "*batch num_steps"] | None
    final_energy: Float[Array, "*batch"] | None
    uncorrected: Float[Array, "*batch horizon action_dim"] | None
    uncorrected_energy: Float[Array, "*batch"] | None
    delta_norm: Float[Array, "*batch"] | None
    num_applied: Int[Array, "*batch"]
    num_skipped: Int[Array, "*batch"]
    fell_back: Bool[Array, "*batch"]
    post: CorrectionInfo | None
    candidate_energy: Float[Array, "*batch n"] | None
    selected: Int[Array, "*batch"] | None


def _sample_info(**fields) -> SampleInfo:
    """A `SampleInfo` whose optional fields default to `None`."""
    optional = ("step_energy", "final_energy", "uncorrected", "uncorrected_energy")
    optional += ("delta_norm", "post", "candidate_energy", "selected")
    return SampleInfo(**{**dict.fromkeys(optional), **fields})


def _all_finite(x: Array) -> Bool[Array, ""]:
    return jnp.all(jnp.isfinite(x))


class _Flow(eqx.Module):
    """Everything one sample's Euler loop needs, with the energy bound to its context."""

    velocity: VelocityFn
    context: Context
    convention: AbstractConvention
    energy: BoundEnergy | None
    corrector: AbstractCorrector
    num_steps: int = eqx.field(static=True)
    step_energies: bool = eqx.field(static=True)
    track_uncorrected: bool = eqx.field(static=True)

    def v(self, x: Actions, t: Scalar) -> Actions:
        out = self.velocity(self.context, x, t)
        if getattr(out, "shape", None) != x.shape:
            raise ValueError(
                f"The velocity function must return an array of the sample's shape "
                f"{shape_str(x)}; got {shape_str(out)}."
            )
        return out.astype(x.dtype)

    def energy_of_estimate(self, x: Actions, v: Actions, t: Scalar) -> Scalar | None:
        """The energy of the denoised estimate, when step energies are recorded."""
        if self.energy is None or not self.step_energies:
            return None
        return self.energy(self.convention.denoised(x, v, t))

    def _recorded(self, x: Actions, v: Actions, t: Scalar) -> Scalar:
        # Branches of a `lax.cond` must agree, so an unrecorded energy is a NaN stand-in.
        e = self.energy_of_estimate(x, v, t)
        return jnp.full((), jnp.nan, x.dtype) if e is None else e

    def plain_step(self, x: Actions, t: Scalar, dt: Scalar) -> tuple[Actions, Scalar | None]:
        v = self.v(x, t)
        return x + dt * v, self.energy_of_estimate(x, v, t)

    def integrate(self, noise: Actions, placement: AbstractInterleaved | None, key: Key):
        """The Euler loop, one `lax.scan` over the flow steps."""
        dtype = noise.dtype
        grid = self.convention.times(self.num_steps, dtype)
        dt = jnp.asarray(self.convention.direction / self.num_steps, dtype)
        if placement is None:
            active = jnp.zeros(self.num_steps, bool)
        else:
            active = placement.schedule.mask(self.num_steps)
        track = placement is not None and self.track_uncorrected
        keys = jax.random.split(key, self.num_steps)

        def body(carry, xs):
            x, x_plain = carry
            t, t_next, scheduled, step_key = xs
            if placement is None:
                x_next, e = self.plain_step(x, t, dt)
                flags = (jnp.array(False), jnp.array(False))
            else:
                w = placement.weight(t, self.convention)
                # The predicate depends on the step and the weight only, never on a
                # batched value, so under vmap this stays a real branch and
                # unscheduled steps cost nothing extra.
                on = scheduled & (w != 0)
                if isinstance(placement, Denoised):
                    x_next, e, applied = self._denoised_step(x, t, t_next, dt, w, on, step_key)
                elif isinstance(placement, Guided):
                    x_next, e, applied = self._guided_step(placement, x, t, dt, w, on)
                else:
                    raise TypeError(f"Unknown interleaved placement {type(placement).__name__}.")
                flags = (applied, on & jnp.logical_not(applied))
            if track:
                x_plain, _ = self.plain_step(x_plain, t, dt)
            return (x_next, x_plain), (e, flags)

        xs = (grid[:-1], grid[1:], active, keys)
        init = (noise, noise if track else None)
        (x, x_plain), (energies, (applied, skipped)) = jax.lax.scan(body, init, xs)
        counts = (jnp.sum(applied, dtype=jnp.int32), jnp.sum(skipped, dtype=jnp.int32))
        return x, (x_plain if track else None), energies, counts

    def _denoised_step(self, x, t, t_next, dt, w, on, key):
        assert self.energy is not None
        v = self.v(x, t)
        a_hat = self.convention.denoised(x, v, t)

        def correct(a_hat):
            a_corr, info = correct_prepared(self.energy, a_hat, self.corrector, key)
            delta = w * (a_corr - a_hat)
            ok = jnp.logical_not(info.fell_back) & _all_finite(delta)
            return info.energy_before, jnp.where(ok, delta, 0), ok

        def skip(a_hat):
            return self._recorded(x, v, t), jnp.zeros_like(a_hat), jnp.array(False)

        e, delta, applied = jax.lax.cond(on, correct, skip, a_hat)
        x_next = x + dt * v
        # Same noise estimate, denoised estimate moved by delta (see `Denoised`).
        shifted = x_next + self.convention.progress(t_next).astype(x.dtype) * delta
        return jnp.where(applied, shifted, x_next), e, applied

    def _guided_step(self, placement: Guided, x, t, dt, w, on):
        assert self.energy is not None
        energy = self.energy

        def guide(x):
            def estimate(x):
                v = self.v(x, t)
                return self.convention.denoised(x, v, t), v

            a_hat, pullback, v = jax.vjp(estimate, x, has_aux=True)
            e, grad_a = jax.value_and_grad(energy)(a_hat)
            (g,) = pullback(grad_a)
            # dt has the sign `direction`; this term makes dt * added point downhill.
            added = -self.convention.direction * w * g
            norm = jnp.linalg.norm(added)
            bound = placement.cap.astype(x.dtype) * jnp.linalg.norm(v)
            added = added * jnp.where(norm > bound, bound / jnp.where(norm > 0, norm, 1), 1)
            ok = jnp.isfinite(e) & _all_finite(added)
            return jnp.where(ok, v + added, v), e, ok

        def plain(x):
            v = self.v(x, t)
            return v, self._recorded(x, v, t), jnp.array(False)

        v, e, applied = jax.lax.cond(on, guide, plain, x)
        return x + dt * v, e, applied


def _sample_single(
    flow: _Flow, placement: AbstractPlacement | None, noise: Array, key: Key
) -> tuple[Actions, SampleInfo]:
    """One sample (or, for best-of-N, one context) from its noise; no batching."""
    steps_key, post_key = jax.random.split(key)
    energy = flow.energy
    if isinstance(placement, BestOfN):
        keys = jax.random.split(steps_key, placement.n)
        candidates, infos = jax.vmap(lambda nz, k: _sample_single(flow, placement.inner, nz, k))(
            noise, keys
        )
        assert infos.final_energy is not None
        scores = jnp.where(jnp.isfinite(infos.final_energy), infos.final_energy, jnp.inf)
        index = jnp.argmin(scores).astype(jnp.int32)
        actions, info = jax.tree.map(lambda a: a[index], (candidates, infos))
        info = eqx.tree_at(
            lambda i: (i.candidate_energy, i.selected),
            info,
            (scores, index),
            is_leaf=lambda x: x is None,
        )
        if placement.then is None:
            return actions, info
        return _post_hoc(flow, actions, info, post_key)

    interleaved = placement if isinstance(placement, AbstractInterleaved) else None
    x, x_plain, energies, (applied, skipped) = flow.integrate(noise, interleaved, steps_key)
    step_energy = energies if flow.step_energies else None
    if energy is None:
        zero = jnp.asarray(0, jnp.int32)
        return x, _sample_info(num_applied=zero, num_skipped=zero, fell_back=jnp.array(False))
    if interleaved is None:
        e = energy(x)
        info = _sample_info(
            step_energy=step_energy,
            final_energy=e,
            uncorrected=x,
            uncorrected_energy=e,
            delta_norm=jnp.zeros((), x.dtype),
            num_applied=applied,
            num_skipped=skipped,
            fell_back=jnp.array(False),
        )
        if isinstance(placement, PostHoc):
            return _post_hoc(flow, x, info, post_key)
        return x, info

    e = energy(x)
    ok = _all_finite(x) & jnp.isfinite(e)
    if x_plain is None:
        # Without the uncorrected chain there is nothing to fall back to; corrections
        # were already skipped step by step wherever they were not finite.
        uncorrected = uncorrected_energy = delta_norm = None
        fell_back = jnp.array(False)
    else:
        uncorrected, uncorrected_energy = x_plain, energy(x_plain)
        x = jnp.where(ok, x, x_plain)
        e = jnp.where(ok, e, uncorrected_energy)
        delta_norm = jnp.linalg.norm(x - x_plain)
        fell_back = jnp.logical_not(ok)
    info = _sample_info(
        step_energy=step_energy,
        final_energy=e,
        uncorrected=uncorrected,
        uncorrected_energy=uncorrected_energy,
        delta_norm=delta_norm,
        num_applied=applied,
        num_skipped=skipped,
        fell_back=fell_back,
    )
    return x, info


def _post_hoc(flow: _Flow, actions: Actions, info: SampleInfo, key: Key):
    """Runs the corrector on a finished chunk; `correct_prepared` keeps it finite."""
    assert flow.energy is not None
    out, post = correct_prepared(flow.energy, actions, flow.corrector, key)
    reference = actions if info.uncorrected is None else info.uncorrected
    delta_norm = jnp.linalg.norm(out - reference)
    info = eqx.tree_at(
        lambda i: (i.final_energy, i.delta_norm, i.fell_back, i.post),
        info,
        (post.energy_after, delta_norm, info.fell_back | post.fell_back, post),
        is_leaf=lambda x: x is None,
    )
    return out, info


def _noise_shape(placement: AbstractPlacement | None, chunk_shape: tuple[int, ...]) -> tuple:
    if isinstance(placement, BestOfN):
        return (placement.n, *chunk_shape)
    return tuple(chunk_shape)


@eqx.filter_jit
def sample(
    velocity: VelocityFn,
    context: Context,
    key: Key | None = None,
    *,
    noise: Float[Array, "..."] | None = None,
    chunk_shape: tuple[int, int] | None = None,
    batch_size: int | None = None,
    num_steps: int = 10,
    convention: AbstractConvention = OpenPI(),
    placement: AbstractPlacement | None = None,
    energy: EnergyFn | None = None,
    energy_context: Context | None = None,
    corrector: AbstractCorrector = reference_recipe(),
    step_energies: bool = True,
    track_uncorrected: bool = True,
) -> tuple[Float[Array, "*batch horizon action_dim"], SampleInfo]:
    """Samples action chunks from a flow-matching policy, with a placed correction.

    Fixed-step explicit Euler from noise to actions, `num_steps` steps in one
    `lax.scan`, compiled once. Without a correction it is exactly the plain Euler loop
    (openpi's `sample_actions` in the [`flowcorrect.OpenPI`][] convention). Every
    placement keeps the robot safe: a correction that is not finite is skipped, and a
    final chunk that is not finite is replaced by the uncorrected chunk from the same
    noise (flagged in `info.fell_back`).

    **Arguments:**

    - `velocity`: the policy's velocity field, called as `velocity(context, x_t, t)`
        with `x_t` of shape `(horizon, action_dim)` and `t` a scalar array; returns an
        array of the shape of `x_t`. An `eqx.Module` (its arrays are traced, so new
        weights do not recompile) or a function (static: pass the same object).
    - `context`: the policy's context for one observation (e.g. the prefix's KV cache),
        or for a batch a pytree whose every array has a leading batch axis.
    - `key`: a PRNG key. Draws the noise when `noise` is not given, and drives
        stochastic correctors. For a batch it is split, `jax.random.split(key, batch)`,
        one key per sample. Defaults to `jax.random.key(0)` when `noise` is given.
    - `noise`: the starting noise, `(horizon, action_dim)`, or `(batch, horizon,
        action_dim)` for a batch; for [`flowcorrect.BestOfN`][] with an extra axis
        of size `n` before the chunk's axes.
    - `chunk_shape`: `(horizon, action_dim)`; needed when `noise` is not given.
    - `batch_size`: draw a batch of this size from `key` (with a batched `context`).
    - `num_steps`: the number of Euler steps (openpi's default is 10). Static.
    - `convention`: the flow-time convention, [`flowcorrect.OpenPI`][] (default,
        `t = 1` is noise) or [`flowcorrect.Reverse`][] (`t = 0` is noise).
    - `placement`: where the correction goes: [`flowcorrect.PostHoc`][],
        [`flowcorrect.Denoised`][], [`flowcorrect.Guided`][] or
        [`flowcorrect.BestOfN`][]. Defaults to `PostHoc()` when an energy is given and
        to no correction when none is.
    - `energy`: any [`flowcorrect.EnergyFn`][]; needed by every placement.
    - `energy_context`: the energy's context for the same observation(s) when it
        differs from the policy's (a learned energy reads the prefix's tokens and mask,
        the velocity a KV cache). Defaults to `context`. Encoded once per observation.
    - `corrector`: the corrector of [`flowcorrect.PostHoc`][],
        [`flowcorrect.Denoised`][] (run on the denoised estimate at each scheduled
        step) and `BestOfN(then=PostHoc())`; unused by [`flowcorrect.Guided`][].
        Defaults to [`flowcorrect.reference_recipe`][].
    - `step_energies`: record the energy of the denoised estimate at every flow step
        (`info.step_energy`). Costs one energy evaluation per step where the placement
        does not compute it anyway; `False` saves it. Static.
    - `track_uncorrected`: for interleaved placements, also integrate the plain flow
        from the same noise (one more policy evaluation per step) for
        `info.uncorrected`, `info.delta_norm` and the whole-chunk fallback. With
        `False` non-finite corrections are still skipped step by step, but a chunk made
        non-finite by the policy's response to a corrected sample cannot be replaced.
        Post-hoc and best-of-N placements get the uncorrected chunk for free. Static.

    **Returns:**

    `(actions, info)`: the chunk(s), `(horizon, action_dim)` or `(batch, horizon,
    action_dim)`, and a [`flowcorrect.SampleInfo`][].

    !!! example

        ```python
        import flowcorrect as fc

        actions, info = fc.sample(
            velocity, context, key, chunk_shape=(50, 32), energy=energy,
            placement=fc.Denoised(schedule=fc.LastSteps(3), weight=0.5),
        )
        print(info.uncorrected_energy, info.final_energy, info.delta_norm)
        ```
    """
    if not callable(velocity):
        raise TypeError(
            "`velocity` must be callable as velocity(context, x_t, t); "
            f"got {type(velocity).__name__}."
        )
    if not isinstance(convention, AbstractConvention):
        raise TypeError(
            "`convention` must be fc.OpenPI() (t = 1 is noise) or fc.Reverse() (t = 0 is "
            f"noise); got {type(convention).__name__}."
        )
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"`num_steps` must be an int >= 1 (openpi uses 10); got {num_steps!r}.")
    if placement is None and energy is not None:
        placement = PostHoc()
    if placement is not None and not isinstance(placement, AbstractPlacement):
        raise TypeError(
            "`placement` must be PostHoc(), Denoised(...), Guided(...) or BestOfN(...); "
            f"got {type(placement).__name__}."
        )
    if placement is not None and energy is None:
        raise ValueError(f"The {type(placement).__name__} placement needs an `energy`.")
    if not isinstance(corrector, AbstractCorrector):
        raise TypeError(
            "`corrector` must be an AbstractCorrector (e.g. fc.reference_recipe()); "
            f"got {type(corrector).__name__}."
        )

    if noise is None:
        if key is None:
            raise ValueError("Give `key` (to draw the noise) or `noise`.")
        if chunk_shape is None:
            raise ValueError("Give `chunk_shape=(horizon, action_dim)` when drawing noise.")
        chunk_shape = tuple(chunk_shape)
        if len(chunk_shape) != 2:
            raise ValueError(f"`chunk_shape` must be (horizon, action_dim); got {chunk_shape}.")
        per_sample = _noise_shape(placement, chunk_shape)
        batched = batch_size is not None
        dtype = jnp.result_type(float)
    else:
        if not jnp.issubdtype(noise.dtype, jnp.floating):
            raise ValueError(f"`noise` must be floating point; got dtype {noise.dtype}.")
        ndim = len(_noise_shape(placement, (0, 0)))
        if noise.ndim not in (ndim, ndim + 1):
            expected = "(n, horizon, action_dim)" if ndim == 3 else "(horizon, action_dim)"
            raise ValueError(
                f"`noise` must have shape {expected} for one sample, or with a leading "
                f"batch axis for a batch; got {shape_str(noise)}."
            )
        batched = noise.ndim == ndim + 1
        per_sample = noise.shape[1:] if batched else noise.shape
        if chunk_shape is not None and tuple(chunk_shape) != per_sample[-2:]:
            raise ValueError(
                f"`chunk_shape` {tuple(chunk_shape)} does not match the noise's shape "
                f"{shape_str(noise)}."
            )
        if isinstance(placement, BestOfN) and per_sample[0] != placement.n:
            raise ValueError(
                f"BestOfN(n={placement.n}) needs noise with {placement.n} candidates on the "
                f"axis before (horizon, action_dim); got noise of shape {shape_str(noise)}."
            )
        if batched and batch_size is not None and batch_size != noise.shape[0]:
            raise ValueError(
                f"`batch_size` {batch_size} does not match the noise's batch axis {noise.shape[0]}."
            )
        dtype = noise.dtype
        if key is None:
            key = jax.random.key(0)

    def one(ctx, ectx, nz, k):
        noise_key, k = jax.random.split(k)
        if nz is None:
            nz = jax.random.normal(noise_key, per_sample, dtype)
        bound = None if energy is None else prepare(energy, ctx if ectx is None else ectx)
        flow = _Flow(
            velocity, ctx, convention, bound, corrector, num_steps, step_energies, track_uncorrected
        )
        return _sample_single(flow, placement, nz, k)

    if not batched:
        return one(context, energy_context, noise, key)
    batch = noise.shape[0] if noise is not None else batch_size
    assert batch is not None
    check_batched_context(context, batch)
    if energy_context is not None:
        check_batched_context(energy_context, batch, "energy_context")
    keys = jax.random.split(key, batch)
    axes = (eqx.if_array(0), eqx.if_array(0), None if noise is None else 0, 0)
    return eqx.filter_vmap(one, in_axes=axes)(context, energy_context, noise, keys)
