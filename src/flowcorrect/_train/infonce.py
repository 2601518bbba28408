"""The InfoNCE loss over all pairs of a batch, computed without copying contexts."""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._misc import shape_str
from .._model.context import TokenContext
from .._model.energy_model import EmbeddedActions, EncodedContext, EnergyModel
from .batch import check_token_context


def typed_key(key: Any) -> Any:
    """A new-style typed PRNG key from either kind (`jax.random.key` or `PRNGKey`)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def encode_batch(model: EnergyModel, contexts: TokenContext) -> EncodedContext:
    """Encodes a batch of contexts, once each: `jax.vmap(model.encode)`."""
    contexts = check_token_context(contexts, "contexts")
    if contexts.tokens.ndim != 3:
        raise ValueError(
            "`contexts` must hold a batch: tokens (batch, seq, context_dim); got "
            f"{shape_str(contexts.tokens)}."
        )
    return jax.vmap(model.encode)(contexts)


def embed_batch(
    model: EnergyModel, actions: Float[Array, "*batch horizon action_dim"], keys: Any = None
) -> EmbeddedActions:
    """Embeds chunks with any leading batch axes, each once; `keys` (same leading shape)
    are their dropout keys, needed only in training mode."""
    lead = actions.shape[:-2]
    flat = actions.reshape(-1, *actions.shape[-2:])
    if keys is None:
        emb = jax.vmap(lambda a: model.embed_actions(a))(flat)
    else:
        emb = jax.vmap(lambda a, k: model.embed_actions(a, key=k))(flat, keys.reshape(-1))
    return jax.tree.map(lambda x: x.reshape(*lead, *x.shape[1:]), emb)


def pair_energies(
    model: EnergyModel,
    encoded: EncodedContext,
    embedded: EmbeddedActions,
    *,
    pair_chunk: int | None = None,
) -> Float[Array, "num_contexts num_chunks"]:
    """`E[i, j]`: every encoded context `i` against every embedded chunk `j`.

    Broadcasting, not copying: each context is encoded once and each chunk embedded
    once, and only the attention and the head run per pair. With `pair_chunk`, rows
    are computed `pair_chunk` contexts at a time under `jax.checkpoint`, so that
    memory for the attention weights is `pair_chunk x num_chunks` pairs, not all of them
    (in the forward and the backward pass).
    """

    def row(enc: EncodedContext) -> Array:
        return jax.vmap(lambda emb: model.score_embedded(enc, emb))(embedded)

    if pair_chunk is None:
        return jax.vmap(row)(encoded)
    return jax.lax.map(jax.checkpoint(row), encoded, batch_size=pair_chunk)


def _grad_norms(model: EnergyModel, encoded: EncodedContext, actions: Array, keys: Any) -> Array:
    """`||grad_a E(s_i, a)||` for `actions` of shape `(batch, *rest, horizon, action_dim)`,
    each chunk under its dropout key in `keys` (shape `(batch, *rest)`, or None)."""

    def one(enc: EncodedContext, a: Array, k: Any) -> Array:
        def energy(x: Array) -> Array:
            return model.score_embedded(enc, model.embed_actions(x, key=k))

        return jnp.linalg.norm(jax.grad(energy)(a))

    lead = actions.shape[:-2]
    flat = actions.reshape(lead[0], -1, *actions.shape[-2:])
    if keys is None:
        out = jax.vmap(lambda e, a: jax.vmap(lambda x: one(e, x, None))(a))(encoded, flat)
    else:
        keys = keys.reshape(flat.shape[:2])
        out = jax.vmap(lambda e, a, k: jax.vmap(lambda x, kk: one(e, x, kk))(a, k))(
            encoded, flat, keys
        )
    return out.reshape(lead)


def info_nce(
    model: EnergyModel,
    contexts: TokenContext,
    actions: Float[Array, "batch horizon action_dim"],
    *,
    tau: Any = 0.5,
    extra_negatives: Float[Array, "batch num_negatives horizon action_dim"] | None = None,
    grad_penalty: Any = 0.0,
    grad_margin: Any = 0.0,
    pair_chunk: int | None = None,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The InfoNCE loss of an energy model over all pairs of a batch (Oord et al., 2018).

    With `E[i, j]` the energy of chunk `j` under context `i`, the logits of row `i` are
    `-E[i, :] / tau` over the `B` chunks of the batch (positive on the diagonal) followed
    by `-E_extra[i, :] / tau` over the extra negatives of context `i`; the loss is the
    mean over rows of the cross-entropy of the positive,
    `L = mean_i [ logsumexp_j(-E[i, j] / tau) + E[i, i] / tau ]`. Contexts are encoded
    once and chunks embedded once; pairs are scored by broadcasting (see
    [`flowcorrect.pair_energies`][]), never by copying each context `B` times.

    With `grad_penalty > 0` the loss adds
    `grad_penalty * mean(max(0, ||grad_a E|| - grad_margin)^2)`, the gradient norm
    taken per chunk at the positives and at the extra negatives (where corrections
    start), as in implicit behavioural cloning (Florence et al., 2021), to keep the
    energy smooth enough that small steps lower it.

    **Arguments:**

    - `model`: the [`flowcorrect.EnergyModel`][].
    - `contexts`: a batched [`flowcorrect.TokenContext`][], tokens `(B, seq, dim)`.
    - `actions`: the expert chunks, `(B, horizon, action_dim)`.
    - `tau`: the temperature. Default 0.5.
    - `extra_negatives`: optional `(B, K, horizon, action_dim)`: perturbed expert chunks,
        policy samples, ... appended as `K` extra columns of row `i` only.
    - `grad_penalty`, `grad_margin`: the gradient penalty's weight and margin.
    - `pair_chunk`: score this many contexts at a time (saves memory); `None` = all.
    - `key`: a PRNG key for dropout; needed only when the model is in training mode.

    **Returns:**

    `(loss, metrics)`: the scalar loss to minimise, and a dict with `loss` (the same),
    `infonce`, `grad_penalty` (the penalty term before weighting), `e_pos` (mean
    diagonal energy), `e_neg` (mean off-diagonal in-batch energy), `e_neg_extra` (mean
    energy of the extra negatives; only when given), `accuracy` (fraction of rows whose
    positive has strictly the lowest energy of the row), `grad_norm` (mean
    `||grad_a E||` at the positives).
    """
    batch = actions.shape[0]
    if actions.ndim != 3:
        raise ValueError(
            f"`actions` must be (batch, horizon, action_dim); got {shape_str(actions)}."
        )
    if batch < 2:
        raise ValueError(f"InfoNCE needs a batch of at least 2 pairs; got {batch}.")
    if extra_negatives is not None and (
        extra_negatives.ndim != 4
        or extra_negatives.shape[0] != batch
        or extra_negatives.shape[2:] != actions.shape[1:]
    ):
        raise ValueError(
            f"`extra_negatives` has shape {shape_str(extra_negatives)}; for actions of shape "
            f"{shape_str(actions)} it needs (batch, num_negatives, "
            f"{', '.join(map(str, actions.shape[1:]))})."
        )
    tau = jnp.asarray(tau, jnp.float32)
    k_pos = k_neg = None
    if key is not None:
        k1, k2 = jax.random.split(typed_key(key))
        k_pos = jax.random.split(k1, batch)
        if extra_negatives is not None:
            k_neg = jax.random.split(k2, extra_negatives.shape[:2])
    encoded = encode_batch(model, contexts)
    embedded = embed_batch(model, actions, k_pos)
    energies = pair_energies(model, encoded, embedded, pair_chunk=pair_chunk)
    diag = jnp.diagonal(energies)
    logits = -energies / tau
    others = energies + jnp.where(jnp.eye(batch, dtype=bool), jnp.inf, 0)
    metrics = {}
    if extra_negatives is not None:
        emb_neg = embed_batch(model, extra_negatives, k_neg)
        e_extra = jax.vmap(lambda enc, emb: jax.vmap(lambda e: model.score_embedded(enc, e))(emb))(
            encoded, emb_neg
        )
        logits = jnp.concatenate([logits, -e_extra / tau], axis=1)
        others = jnp.concatenate([others, e_extra], axis=1)
        metrics["e_neg_extra"] = jnp.mean(e_extra)
    infonce = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))

    pos_norms = _grad_norms(model, encoded, actions, k_pos)
    if isinstance(grad_penalty, int | float) and grad_penalty == 0:
        # Off: the norms are a metric only, so skip differentiating through them twice.
        pos_norms = jax.lax.stop_gradient(pos_norms)
        penalty = jnp.zeros((), jnp.float32)
        loss = infonce
    else:
        norms = pos_norms.reshape(batch, 1)
        if extra_negatives is not None:
            neg_norms = _grad_norms(model, encoded, extra_negatives, k_neg)
            norms = jnp.concatenate([norms, neg_norms], axis=1)
        penalty = jnp.mean(jnp.square(jnp.maximum(norms - grad_margin, 0)))
        loss = infonce + jnp.asarray(grad_penalty, jnp.float32) * penalty
    off = jnp.logical_not(jnp.eye(batch, dtype=bool))
    metrics.update(
        loss=loss,
        infonce=infonce,
        grad_penalty=penalty,
        e_pos=jnp.mean(diag),
        e_neg=jnp.sum(jnp.where(off, energies, 0)) / (batch * (batch - 1)),
        accuracy=jnp.mean((diag < jnp.min(others, axis=1)).astype(jnp.float32)),
        grad_norm=jnp.mean(pos_norms),
    )
    return loss, metrics


def info_nce_batch(model: EnergyModel, batch: Any, **kwargs: Any) -> Any:
    """[`flowcorrect.info_nce`][] on a [`flowcorrect.Batch`][] (its negatives as extras)."""
    return info_nce(model, batch.context, batch.actions, extra_negatives=batch.negatives, **kwargs)
