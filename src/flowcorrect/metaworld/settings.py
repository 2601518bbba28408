"""Sampler settings: the plain policy and every correction, behind one function.

A [`Setting`][] names what the sampler does for one control query: the noise
temperature, the energy (by name, looked up in a dict of energies), the placement and
its corrector. [`make_act`][] turns a setting into the batched act function the
evaluation calls, one compiled call for all environments per query.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._placements.plain import Plain
from .._sample import sample
from .policy import FlowMLPPolicy


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sampler configuration.

    - `name`: the row label in tables.
    - `noise_scale`: the initial noise is multiplied by this (lower temperature < 1).
    - `energy`: the name of the energy in the `energies` dict, or `None` (plain).
    - `placement`: a flowcorrect placement carrying its own corrector
        (`fc.PostHoc(corrector)`, `fc.Denoised(corrector, ...)`, `fc.Guided(...)`,
        `fc.BestOfN(n)`); needed with an energy.
    - `num_steps`: Euler steps of the flow.
    """

    name: str
    noise_scale: float = 1.0
    energy: str | None = None
    placement: Any = None
    num_steps: int = 10

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "noise_scale": self.noise_scale,
            "energy": self.energy,
            "placement": repr(self.placement),
            "num_steps": self.num_steps,
        }


def draw_noise(setting: Setting, key, batch: int, chunk_shape) -> jax.Array:
    """The starting noise for a query (unscaled): the same draw for every setting of one
    shape, so settings are paired on their noise as well as on their layouts (every
    best-of-8 rule ranks the same 8 candidates). The shape is the placement's own
    (`noise_shape`), so any placement, a user's included, gets the noise it expects."""
    placement = setting.placement
    one = tuple(chunk_shape) if placement is None else placement.noise_shape(chunk_shape)
    return jax.random.normal(key, (batch, *one), jnp.float32)


@eqx.filter_jit
def _run(policy, energy, setting_static, obs, key):
    setting = setting_static.value
    noise = draw_noise(setting, key, obs.shape[0], policy.chunk_shape)
    actions, info = sample(
        policy, obs, key, noise=noise, num_steps=setting.num_steps,
        noise_scale=setting.noise_scale,
        placement=Plain() if setting.placement is None else setting.placement, energy=energy,
        track_uncorrected=energy is not None,
    )
    diag = {
        "energy_before": info.uncorrected_energy,
        "energy_after": info.final_energy,
        "delta_norm": info.delta_norm,
        "fell_back": info.fell_back.astype(jnp.float32),
    }
    return actions, {k: v for k, v in diag.items() if v is not None}


class _Static(eqx.Module):
    value: Any = eqx.field(static=True)


def make_act(policy: FlowMLPPolicy, setting: Setting, energies: dict[str, Any]):
    """The batched act function of `setting`: `act(obs [N, obs_dim], key) -> (chunks,
    diagnostics)`, one compiled call per query."""
    energy = None if setting.energy is None else energies[setting.energy]
    static = _Static(setting)

    def act(obs: np.ndarray, key) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        actions, diag = _run(policy, energy, static, jnp.asarray(obs, jnp.float32), key)
        return np.asarray(actions), {k: np.asarray(v) for k, v in diag.items()}

    return act
