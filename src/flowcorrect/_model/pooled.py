"""One vector per observation from a token context: the bridge from a VLM's prefix to a
small energy over vectors (a verifier trained on pooled features)."""

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._custom_types import Actions, Encoded, Scalar
from .._energy import AbstractEnergy, EnergyFn, as_energy
from .._misc import shape_str
from .context import TokenContext


# `context` is annotated loosely so that a wrong type gets the message below, not a
# runtime type checker's.
def pool_tokens(context: TokenContext) -> Float[Array, "*batch context_dim"]:
    """The mean of a context's real tokens (`mask` True), in float32.

    Padding tokens never enter, whatever their values (NaN included); a context with no
    real token pools to zeros. One observation `(seq, d)` gives `(d,)`; a batch
    `(batch, seq, d)` gives `(batch, d)`.

    **Arguments:**

    - `context`: a [`flowcorrect.TokenContext`][], e.g. openpi's `prefix_out` with its
        `prefix_mask`.
    """
    if not isinstance(context, TokenContext):
        raise TypeError(
            "pool_tokens reads a fc.TokenContext(tokens, mask) (mask True for real tokens); "
            f"got {type(context).__name__}."
        )
    real = context.mask[..., None]
    tokens = jnp.where(real, context.tokens.astype(jnp.float32), 0.0)
    count = jnp.sum(real, axis=-2).astype(jnp.float32)
    return jnp.sum(tokens, axis=-2) / jnp.maximum(count, 1.0)


class PooledContext(AbstractEnergy):
    """An energy over pooled features, read from a token context.

    openpi's prefix pass gives `fc.TokenContext(prefix_out, prefix_mask)`; a verifier
    trained on one vector per observation (e.g. an [`flowcorrect.MLPEnergy`][] over
    the pooled prefix features recorded by a served policy) reads
    [`flowcorrect.pool_tokens`][] of it. Pooling is part of `encode`, so it runs once
    per observation.

    **Arguments:**

    - `energy`: any [`flowcorrect.EnergyFn`][] whose context is a `(context_dim,)`
        vector.
    """

    energy: AbstractEnergy

    def __init__(self, energy: EnergyFn):
        self.energy = as_energy(energy)

    def encode(self, context: Any) -> Encoded:
        if not isinstance(context, TokenContext):
            raise TypeError(
                "PooledContext reads a fc.TokenContext (the policy's prefix tokens and "
                f"mask) and pools it; got {type(context).__name__} of "
                f"{shape_str(context) if hasattr(context, 'shape') else 'no shape'}. An "
                "energy over vectors needs no PooledContext."
            )
        return self.energy.encode(pool_tokens(context))

    def score(self, encoded: Encoded, actions: Actions) -> Scalar:
        return self.energy.score(encoded, actions)

