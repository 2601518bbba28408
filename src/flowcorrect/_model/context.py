"""The context a learned energy reads: a sequence of tokens and which of them are real."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .._custom_types import RealLike
from .._misc import shape_str


class TokenContext(eqx.Module):
    """The context of one observation (or a batch): tokens and a mask of real tokens.

    !!! warning "`mask` is True for REAL tokens"

        This follows openpi's `prefix_mask` (True = a real token, False = padding).
        The reference energy model expected the opposite (True = padding). If you have
        a padding mask, build the context with
        [`flowcorrect.TokenContext.from_padding_mask`][], never by passing it as `mask`.

    **Arguments:**

    - `tokens`: `(seq, context_dim)` for one observation, `(batch, seq, context_dim)`
        for a batch; e.g. the output of openpi's prefix pass (`prefix_out`).
    - `mask`: boolean, same leading shape as `tokens` without the last axis: `True`
        where a token is real, `False` where it is padding. `None` (the default)
        means every token is real.

    Padding tokens never change the energy, whatever their values (NaN included). A
    context that is all padding is allowed: the model then attends only to its learned
    null token and gives a finite energy.
    """

    tokens: Float[Array, "*batch seq context_dim"]
    mask: Bool[Array, "*batch seq"]

    def __init__(self, tokens: RealLike, mask: RealLike | None = None):
        self.tokens = jnp.asarray(tokens)
        if mask is None:
            mask = jnp.ones(self.tokens.shape[:-1], dtype=bool)
        self.mask = jnp.asarray(mask)
        # Checked here rather than in __check_init__, so that this message, not a
        # runtime type checker's, is what a wrong mask produces.
        self._check()

    def _check(self) -> None:
        if self.tokens.ndim < 2:
            raise ValueError(
                "`tokens` must have shape (seq, context_dim) or (batch, seq, context_dim); "
                f"got {shape_str(self.tokens)}."
            )
        if self.mask.dtype != jnp.bool_:
            raise ValueError(
                f"`mask` must be boolean (True = real token, False = padding); got dtype "
                f"{self.mask.dtype}. Convert with `mask.astype(bool)`; if yours marks "
                "padding with True, use TokenContext.from_padding_mask instead."
            )
        if self.mask.shape != self.tokens.shape[:-1]:
            raise ValueError(
                f"`mask` has shape {shape_str(self.mask)} but `tokens` has shape "
                f"{shape_str(self.tokens)}; the mask needs shape {self.tokens.shape[:-1]}."
            )

    @classmethod
    def from_padding_mask(cls, tokens: Any, padding_mask: Any) -> "TokenContext":
        """Builds a context from a mask that is True for PADDING (the reference's convention).

        **Arguments:**

        - `tokens`: as for [`flowcorrect.TokenContext`][].
        - `padding_mask`: boolean, `True` where a token is padding.

        **Returns:**

        A [`flowcorrect.TokenContext`][] with `mask = ~padding_mask`.
        """
        padding_mask = jnp.asarray(padding_mask)
        if padding_mask.dtype != jnp.bool_:
            raise ValueError(
                f"`padding_mask` must be boolean (True = padding); got dtype {padding_mask.dtype}."
            )
        return cls(tokens, jnp.logical_not(padding_mask))


def check_context(context: Any, context_dim: int) -> TokenContext:
    """Checks that `context` is one observation's `TokenContext` of the right width."""
    if not isinstance(context, TokenContext):
        raise TypeError(
            "EnergyModel reads a flowcorrect.TokenContext(tokens, mask) (mask True = real "
            f"token); got {type(context).__name__}."
        )
    if context.tokens.ndim != 2:
        raise ValueError(
            "EnergyModel.encode takes the context of ONE observation, tokens of shape "
            f"(seq, context_dim); got {shape_str(context.tokens)}. For a batch use "
            "jax.vmap (flowcorrect.correct does this for you)."
        )
    if context.tokens.shape[-1] != context_dim:
        raise ValueError(
            f"This EnergyModel was built for context tokens of width {context_dim}; got "
            f"tokens of shape {shape_str(context.tokens)}. Use a model whose "
            "`context_dim` matches the policy's token width."
        )
    if not jnp.issubdtype(context.tokens.dtype, jnp.floating):
        raise ValueError(f"context tokens must be floating point; got {context.tokens.dtype}.")
    return context
