"""The reference's user API on openpi's Pi0, as one call of `fc.sample`."""

from typing import Any

from .._correctors.recipes import reference_recipe
from .._energy import OnActionDims
from .._placements.base import AbstractPlacement
from .._placements.plain import Plain
from .._placements.post_hoc import PostHoc
from .._sample import sample
from ._pi0 import as_pi0_policy


def sample_actions_with_energy_correction(
    model: Any,
    energy: Any,
    rng: Any,
    observation: Any,
    num_steps: int = 10,
    energy_correction_steps: int = 3,
    energy_alpha: float = 0.1,
    energy_clip_frac: float = 0.2,
    correct_first_only: bool = False,
    *,
    action_dims: int | None = None,
    placement: AbstractPlacement | None = None,
    noise: Any = None,
    return_info: bool = False,
) -> Any:
    """The reference's `sample_actions_with_energy_correction`, with one prefix pass.

    Samples like openpi's `model.sample_actions(rng, observation, num_steps=...)`, then
    corrects the chunk with `energy_correction_steps` clipped gradient steps on
    `energy` (the reference recipe, [`flowcorrect.reference_recipe`][]). The energy's
    context is the VLM's hidden states over the prefix from the very pass that
    filled the KV cache: the reference's "method B" (sample, then run the prefix a
    second time to get those states, then correct) pays for the prefix twice, which
    is most of the cost of a call.

    **Arguments:**

    - `model`: openpi's JAX `Pi0` (Pi0 or Pi0.5, checkpoint params loaded unchanged),
        or a [`flowcorrect.openpi.Pi0Policy`][] of one (build it once to skip the
        split on every call).
    - `energy`: any [`flowcorrect.EnergyFn`][] over `fc.TokenContext(prefix_out,
        prefix_mask)` (mask True = real token) and one chunk
        `(action_horizon, action_dim)` in the model's normalised action space, e.g.
        an [`flowcorrect.EnergyModel`][] in inference mode.
    - `rng`: a PRNG key (draws the noise).
    - `observation`: openpi's `Observation`, batched.
    - `num_steps`: flow steps, as in `sample_actions`.
    - `energy_correction_steps`: K (0 = no correction: exactly `sample_actions`).
    - `energy_alpha`, `energy_clip_frac`, `correct_first_only`: the reference's step
        size, clip (fraction of the chunk's norm) and first-action-only switch.
    - `action_dims`: the energy sees, and the correction changes, only the first
        `action_dims` dims of openpi's padded 32 (7 for LIBERO): the energy is wrapped
        in [`flowcorrect.OnActionDims`][] (so it takes chunks of shape
        `(action_horizon, action_dims)`, in the model's normalised action space) and
        the post-hoc recipe is masked to those dims. With `placement`, the energy is
        wrapped likewise.
    - `placement`: instead of the post-hoc recipe, any placement, e.g.
        `fc.BestOfN(8)`, `fc.Guided(schedule=fc.LastSteps(3))`,
        `fc.Denoised(corrector, schedule=fc.LastSteps(3))`; the four arguments above
        are then unused.
    - `noise`: the starting noise `(batch, action_horizon, action_dim)` instead of
        drawing it from `rng`.
    - `return_info`: also return `fc.sample`'s [`flowcorrect.SampleInfo`][].

    **Returns:**

    The actions `(batch, action_horizon, action_dim)`, or `(actions, info)`.
    """
    policy = as_pi0_policy(model)
    if not (isinstance(energy_correction_steps, int) and energy_correction_steps >= 0):
        raise ValueError(
            "`energy_correction_steps` must be an int >= 0 (0 = off, 1-3 real-time, 5-10 "
            f"stronger); got {energy_correction_steps!r}."
        )
    if action_dims is not None and energy is not None:
        energy = OnActionDims(energy, action_dims)
    if placement is None and energy_correction_steps > 0:
        placement = PostHoc(
            reference_recipe(
                energy_correction_steps,
                energy_alpha,
                energy_clip_frac,
                first_only=correct_first_only,
                action_dims=action_dims,
            )
        )
    actions, info = sample(
        policy,
        observation,
        rng,
        noise=noise,
        num_steps=num_steps,
        placement=Plain() if placement is None else placement,
        energy=None if placement is None else energy,
    )
    return (actions, info) if return_info else actions
