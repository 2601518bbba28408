"""The InfoNCE loss over all pairs of a batch, computed without copying contexts."""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import Context, Encoded, RealLike
from .._misc import shape_str
from .._model.base import AbstractLearnedEnergy, Embedded


def typed_key(key: Any) -> Any:
    """A new-style typed PRNG key from either kind (`jax.random.key` or `PRNGKey`)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def check_learned(model: Any, owner: str) -> AbstractLearnedEnergy:
    if not isinstance(model, AbstractLearnedEnergy):
        raise TypeError(
            f"{owner} works on a learned energy: a subclass of fc.AbstractLearnedEnergy "
            "(encode / embed_actions / score_embedded), e.g. fc.EnergyModel or "
            f"fc.MLPEnergy; got {type(model).__name__}."
        )
    return model


def batch_size_of(contexts: Any, name: str = "contexts") -> int:
    """The common leading axis of every array in a batch of contexts (clear errors)."""
    sizes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(contexts):
        shape = getattr(leaf, "shape", None)
        if shape is None:
            continue
        if len(shape) == 0:
            raise ValueError(
                f"`{name}{jax.tree_util.keystr(path)}` is a scalar; a batch of contexts needs "
                "a leading batch axis on every array."
            )
        sizes[jax.tree_util.keystr(path)] = shape[0]
    if not sizes:
        raise TypeError(f"`{name}` holds no arrays; got {type(contexts).__name__}.")
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"The arrays of `{name}` have different leading (batch) axes {sizes}; a batch "
            "of contexts needs the same batch size on every array."
        )
    return next(iter(sizes.values()))


def check_chunks(actions: Any, name: str = "actions") -> None:
    """A clear error unless `actions` is a batch of chunks `(batch, horizon, action_dim)`."""
    shape = getattr(actions, "shape", None)
    if shape is not None and len(shape) == 3:
        return
    hint = ""
    if shape is not None and len(shape) == 2:
        hint = (
            f" A 2-D array {tuple(shape)} looks like a batch of single actions "
            "(batch, action_dim): make chunks of length 1 with actions[:, None, :]."
        )
    raise ValueError(
        f"`{name}` must be a batch of action chunks, shape (batch, horizon, action_dim); "
        f"got {shape_str(actions)}.{hint}"
    )


def encode_batch(model: AbstractLearnedEnergy, contexts: Context) -> Encoded:
    """Encodes a batch of contexts, once each: `jax.vmap(model.encode)`."""
    batch_size_of(contexts)
    return jax.vmap(model.encode)(contexts)


def embed_batch(
    model: AbstractLearnedEnergy,
    actions: Float[Array, "*batch horizon action_dim"],
    keys: Any = None,
) -> Embedded:
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
    model: AbstractLearnedEnergy,
    encoded: Encoded,
    embedded: Embedded,
    *,
    pair_chunk: int | None = None,
) -> Float[Array, "num_contexts num_chunks"]:
    """`E[i, j]`: every encoded context `i` against every embedded chunk `j`.

    Broadcasting, not copying: each context is encoded once and each chunk embedded
    once, and only `score_embedded` runs per pair. With `pair_chunk`, rows are
    computed `pair_chunk` contexts at a time under `jax.checkpoint`, so that memory for
    the per-pair work is `pair_chunk x num_chunks` pairs, not all of them (in the
    forward and the backward pass). [`flowcorrect.train.energy_matrix`][] does the encoding
    and embedding too.
    """

    def row(enc: Any) -> Array:
        return jax.vmap(lambda emb: model.score_embedded(enc, emb))(embedded)

    if pair_chunk is None:
        return jax.vmap(row)(encoded)
    return jax.lax.map(jax.checkpoint(row), encoded, batch_size=pair_chunk)


def energy_matrix(
    model: AbstractLearnedEnergy,
    contexts: Context,
    actions: Float[Array, "num_chunks horizon action_dim"],
    *,
    pair_chunk: int | None = None,
) -> Float[Array, "num_contexts num_chunks"]:
    """The energy of every chunk under every context: a `(B, M)` matrix.

    Each of the `B` contexts is encoded once and each of the `M` chunks embedded once;
    only the per-pair part of the model runs `B x M` times (contexts are never copied).
    Row `i` ranks all `M` chunks for observation `i`, e.g. for best-of-N offline, or to
    see which demonstrations an energy confuses.

    **Arguments:**

    - `model`: an [`flowcorrect.AbstractLearnedEnergy`][], e.g. an
        [`flowcorrect.EnergyModel`][] (in inference mode) or an [`flowcorrect.MLPEnergy`][].
    - `contexts`: a batch of `B` contexts (leading batch axis on every array): a
        batched [`flowcorrect.TokenContext`][], or `(B, obs_dim)` state vectors.
    - `actions`: `M` chunks, `(M, horizon, action_dim)`.
    - `pair_chunk`: score this many contexts at a time (saves memory); `None` = all.

    **Returns:**

    `E` of shape `(B, M)`, float32: `E[i, j] = model(contexts[i], actions[j])`.

    !!! example

        ```python
        E = fc.train.energy_matrix(model, held_out.context, held_out.actions)
        top1 = jnp.mean(jnp.argmin(E, axis=1) == jnp.arange(E.shape[0]))
        ```
    """
    check_learned(model, "energy_matrix")
    check_chunks(actions)
    return pair_energies(
        model, encode_batch(model, contexts), embed_batch(model, actions), pair_chunk=pair_chunk
    )


def _grad_norms(model: AbstractLearnedEnergy, encoded: Any, actions: Array, keys: Any) -> Array:
    """`||grad_a E(s_i, a)||` for `actions` of shape `(batch, *rest, horizon, action_dim)`,
    each chunk under its dropout key in `keys` (shape `(batch, *rest)`, or None)."""

    def one(enc: Any, a: Array, k: Any) -> Array:
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
    model: AbstractLearnedEnergy,
    contexts: Context,
    actions: Float[Array, "batch horizon action_dim"],
    *,
    tau: RealLike = 0.5,
    extra_negatives: Float[Array, "batch num_negatives horizon action_dim"] | None = None,
    grad_penalty: RealLike = 0.0,
    grad_margin: RealLike = 0.0,
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
    [`flowcorrect.train.pair_energies`][]), never by copying each context `B` times.

    With `grad_penalty > 0` the loss adds
    `grad_penalty * mean(max(0, ||grad_a E|| - grad_margin)^2)`, the gradient norm
    taken per chunk at the positives and at the extra negatives (where corrections
    start), as in implicit behavioural cloning (Florence et al., 2021), to keep the
    energy smooth enough that small steps lower it.

    **Arguments:**

    - `model`: any [`flowcorrect.AbstractLearnedEnergy`][] ([`flowcorrect.EnergyModel`][],
        [`flowcorrect.MLPEnergy`][], your own).
    - `contexts`: `B` contexts with a leading batch axis on every array: a batched
        [`flowcorrect.TokenContext`][] (tokens `(B, seq, dim)`) for an `EnergyModel`,
        state vectors `(B, obs_dim)` for an `MLPEnergy`.
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
    energy of the extra negatives; only when given), `top1_accuracy` (fraction of rows
    whose positive has strictly the lowest energy of its row: a figure that falls as
    the batch and the negatives grow, so compare it only at one batch size),
    `pairwise_accuracy` (fraction of (positive, negative) pairs of a row, in-batch and
    extra, in which the positive has strictly the lower energy: independent of the
    batch size in expectation), `grad_norm` (mean `||grad_a E||` at the positives).
    """
    check_learned(model, "info_nce")
    check_chunks(actions)
    batch = actions.shape[0]
    n_ctx = batch_size_of(contexts)
    if n_ctx != batch:
        raise ValueError(
            f"`contexts` holds {n_ctx} contexts but `actions` {batch} chunks "
            f"{shape_str(actions)}; InfoNCE pairs context i with chunk i."
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

    if isinstance(grad_penalty, int | float) and grad_penalty == 0:
        # Off: the norms are a metric only, so skip differentiating through them twice.
        pos_norms = jax.lax.stop_gradient(_grad_norms(model, encoded, actions, k_pos))
        penalty = jnp.zeros((), jnp.float32)
        loss = infonce
    else:
        # Positives and extra negatives in one call: one second-order graph to compile
        # and run, not two.
        chunks, keys = actions[:, None], None if k_pos is None else k_pos[:, None]
        if extra_negatives is not None:
            chunks = jnp.concatenate([chunks, extra_negatives.astype(actions.dtype)], axis=1)
            keys = None if keys is None else jnp.concatenate([keys, k_neg], axis=1)
        norms = _grad_norms(model, encoded, chunks, keys)
        pos_norms = norms[:, 0]
        penalty = jnp.mean(jnp.square(jnp.maximum(norms - grad_margin, 0)))
        loss = infonce + jnp.asarray(grad_penalty, jnp.float32) * penalty
    off = jnp.logical_not(jnp.eye(batch, dtype=bool))
    # Columns of `others` that are negatives of their row: all but the diagonal.
    is_neg = jnp.concatenate([off, jnp.ones((batch, others.shape[1] - batch), bool)], axis=1)
    pairwise = jnp.sum((diag[:, None] < others) & is_neg, axis=1) / (others.shape[1] - 1)
    metrics.update(
        loss=loss,
        infonce=infonce,
        grad_penalty=penalty,
        e_pos=jnp.mean(diag),
        e_neg=jnp.sum(jnp.where(off, energies, 0)) / (batch * (batch - 1)),
        top1_accuracy=jnp.mean((diag < jnp.min(others, axis=1)).astype(jnp.float32)),
        pairwise_accuracy=jnp.mean(pairwise.astype(jnp.float32)),
        grad_norm=jnp.mean(pos_norms),
    )
    return loss, metrics
