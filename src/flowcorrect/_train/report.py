"""Held-out diagnostics: is the energy good for correction, not only for classification?"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._correct import correct_single
from .._correctors.base import AbstractCorrector
from .._correctors.recipes import reference_recipe
from .._custom_types import Context, RealLike
from .._energy import ChunkFn
from .._misc import shape_str
from .._model.base import AbstractLearnedEnergy
from .batch import Batch
from .infonce import check_learned, info_nce, typed_key


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """What [`flowcorrect.train.evaluate`][] measured on held-out data. Floats; `None` where
    not measured (the policy-sample fields need `policy_samples`).

    **Attributes:**

    - `top1_accuracy`: fraction of held-out contexts whose expert chunk has strictly the
        lowest energy among all the batch's chunks. It falls as the batch grows (one
        wrong chunk out of `B - 1` is enough to miss), so compare it at one batch size.
    - `pairwise_accuracy`: fraction of (expert chunk, other chunk) pairs of a context in
        which the expert's has strictly the lower energy; independent of the batch
        size in expectation (0.5 is chance).
    - `loss`: the InfoNCE loss on the held-out batch.
    - `e_pos`, `e_neg`: mean energy of matched and of mismatched (in-batch) pairs.
    - `grad_norm_expert`: median `||grad_a E||` at the expert chunks.
    - `e_policy`: mean energy of the policy samples.
    - `energy_fall_fraction`: fraction of policy samples whose energy falls after one
        correction step (the corrector given to `evaluate`).
    - `towards_expert_fraction`: fraction of policy samples that this step moves closer
        to the expert chunk; `distance_change`: mean change of that distance (< 0 is good).
    - `gradient_cosine`: mean cosine between `-grad_a E` at a policy sample and the
        direction from it to the expert chunk (> 0: the gradient points the right way).
    - `grad_norm_policy`: median `||grad_a E||` at the policy samples (sharpness).
    - `best_of_n_distance`: mean distance to the expert of the lowest-energy sample among
        the `N` per context (offline best-of-N); compare with `mean_sample_distance`
        (a random sample) and `oracle_distance` (the closest sample).
    - `num_contexts`, `num_policy_samples`: the sizes measured on.
    """

    top1_accuracy: float
    pairwise_accuracy: float
    loss: float
    e_pos: float
    e_neg: float
    grad_norm_expert: float
    num_contexts: int
    num_policy_samples: int = 0
    e_policy: float | None = None
    energy_fall_fraction: float | None = None
    fell_back_fraction: float | None = None
    towards_expert_fraction: float | None = None
    distance_change: float | None = None
    gradient_cosine: float | None = None
    grad_norm_policy: float | None = None
    best_of_n_distance: float | None = None
    mean_sample_distance: float | None = None
    oracle_distance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def __str__(self) -> str:
        rows = []
        for k, v in self.to_dict().items():
            rows.append(f"  {k:24s} {v:.4g}" if isinstance(v, float) else f"  {k:24s} {v}")
        return "EvalReport(\n" + "\n".join(rows) + "\n)"


def _norm(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1)))


@eqx.filter_jit
def _measure(
    model: AbstractLearnedEnergy,
    batch: Batch,
    policy_samples: Float[Array, "batch num horizon action_dim"] | None,
    corrector: AbstractCorrector,
    tau: Any,
    pair_chunk: int | None,
    key: PRNGKeyArray,
) -> dict[str, Array]:
    _, metrics = info_nce(model, batch.context, batch.actions, tau=tau, pair_chunk=pair_chunk)
    expert = batch.actions

    def grad_at(context: Any, actions: Array) -> Array:
        return jax.grad(ChunkFn(model, model.encode(context)))(actions)

    g_expert = jax.vmap(grad_at)(batch.context, expert)
    out = {
        "top1_accuracy": metrics["top1_accuracy"],
        "pairwise_accuracy": metrics["pairwise_accuracy"],
        "loss": metrics["loss"],
        "e_pos": metrics["e_pos"],
        "e_neg": metrics["e_neg"],
        "grad_norm_expert": jnp.median(_norm(g_expert)),
    }
    if policy_samples is None:
        return out

    keys = jax.random.split(key, policy_samples.shape[:2])

    def per_context(context: Any, samples: Array, ks: Array) -> Any:
        encoded = model.encode(context)  # encoded once for all N samples

        def one(a: Array, k: Array) -> Any:
            corrected, info = correct_single(model, encoded, a, corrector, k)
            return corrected, info, jax.grad(ChunkFn(model, encoded))(a)

        return jax.vmap(one)(samples, ks)

    corrected, info, grads = jax.vmap(per_context)(batch.context, policy_samples, keys)
    to_expert = expert[:, None] - policy_samples
    d_before = _norm(to_expert)
    d_after = _norm(expert[:, None] - corrected)
    g_norm = _norm(grads)
    cos = -jnp.sum(grads * to_expert, axis=(-2, -1)) / jnp.maximum(g_norm * d_before, 1e-12)
    best = jnp.argmin(info.energy_before, axis=1)
    out.update(
        e_policy=jnp.mean(info.energy_before),
        energy_fall_fraction=jnp.mean(info.energy_after < info.energy_before),
        fell_back_fraction=jnp.mean(info.fell_back),
        towards_expert_fraction=jnp.mean(d_after < d_before),
        distance_change=jnp.mean(d_after - d_before),
        gradient_cosine=jnp.mean(cos),
        grad_norm_policy=jnp.median(g_norm),
        best_of_n_distance=jnp.mean(jnp.take_along_axis(d_before, best[:, None], axis=1)),
        mean_sample_distance=jnp.mean(d_before),
        oracle_distance=jnp.mean(jnp.min(d_before, axis=1)),
    )
    return out


def evaluate(
    model: AbstractLearnedEnergy,
    batch: Batch,
    *,
    policy_samples: Float[Array, "batch num_samples horizon action_dim"] | None = None,
    corrector: AbstractCorrector | None = None,
    tau: RealLike = 0.5,
    pair_chunk: int | None = None,
    to_context: Callable[[Any], Context] | None = None,
    key: PRNGKeyArray | None = None,
) -> EvalReport:
    """Measures, on held-out data, whether an energy is fit for correction.

    Accuracy alone can mislead: a pilot energy with 94% accuracy had gradients so
    sharp that reference-sized steps raised the energy in 85% of states. So besides
    accuracy and `E_pos` vs `E_neg`, this reports, for chunks sampled from the policy on
    the held-out states: how often one correction step lowers the energy and moves the
    chunk towards the expert's, the cosine between `-grad_a E` and the direction to the
    expert, the gradient's size, and how close the lowest-energy of `N` samples is to
    the expert (offline best-of-N, which in a second pilot predicted whether ranking by
    energy helped in closed loop).

    **Arguments:**

    - `model`: any [`flowcorrect.AbstractLearnedEnergy`][]; evaluated in inference mode.
    - `batch`: held-out demonstrations, a [`flowcorrect.train.Batch`][] (at least 2).
    - `policy_samples`: optional `(batch, N, horizon, action_dim)` chunks sampled from
        the policy on the same states.
    - `corrector`: the one correction step to test; defaults to one step of
        [`flowcorrect.reference_recipe`][] (alpha 0.1, clip 20% of the chunk's norm).
    - `tau`: InfoNCE temperature for the held-out loss.
    - `pair_chunk`: as in [`flowcorrect.train.info_nce`][].
    - `to_context`: as in [`flowcorrect.train.fit`][], when `batch.context` is raw observations.
    - `key`: for stochastic correctors; defaults to `jax.random.key(0)`.

    **Returns:**

    An [`flowcorrect.train.EvalReport`][].
    """
    check_learned(model, "evaluate")
    if not isinstance(batch, Batch):
        raise TypeError(f"`batch` must be a flowcorrect.train.Batch; got {type(batch).__name__}.")
    if policy_samples is not None:
        policy_samples = jnp.asarray(policy_samples)
        if (
            policy_samples.ndim != 4
            or policy_samples.shape[0] != batch.size
            or (policy_samples.shape[2:] != batch.actions.shape[1:])
        ):
            raise ValueError(
                f"`policy_samples` has shape {shape_str(policy_samples)}; for held-out actions "
                f"of shape {shape_str(batch.actions)} it needs (batch, N, horizon, action_dim)."
            )
    if to_context is not None:
        batch = Batch(to_context(batch.context), batch.actions, batch.negatives, batch.observation)
    corrector = reference_recipe(num_steps=1) if corrector is None else corrector
    key = jax.random.key(0) if key is None else typed_key(key)
    model = eqx.nn.inference_mode(model)
    out = jax.device_get(_measure(model, batch, policy_samples, corrector, tau, pair_chunk, key))
    values = {k: float(v) for k, v in out.items()}
    return EvalReport(
        num_contexts=batch.size,
        num_policy_samples=0 if policy_samples is None else policy_samples.shape[1],
        **values,
    )
