"""What a training step reads: a batch of contexts, expert chunks and optional negatives."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._misc import shape_str
from .._model.context import TokenContext


class Batch(eqx.Module):
    """A batch of demonstrations: contexts and the expert's action chunks.

    **Arguments:**

    - `context`: a batched [`flowcorrect.TokenContext`][] (tokens
        `(batch, seq, context_dim)`, mask `(batch, seq)`, True = real token); or, when
        [`flowcorrect.fit`][] is given `to_context`, any pytree of raw observations
        with a leading batch axis, which `to_context` turns into one.
    - `actions`: the expert chunks, `(batch, horizon, action_dim)`.
    - `negatives`: optional extra negatives for each context, `(batch, num_negatives,
        horizon, action_dim)`: e.g. chunks sampled from the policy on the same
        demonstration states, precomputed. Scored only against their own context.
    """

    context: Any
    actions: Float[Array, "batch horizon action_dim"]
    negatives: Float[Array, "batch num_negatives horizon action_dim"] | None

    def __init__(self, context: Any, actions: Any, negatives: Any = None):
        self.context = context
        self.actions = jnp.asarray(actions)
        self.negatives = None if negatives is None else jnp.asarray(negatives)
        # Checked here rather than in __check_init__, so that this message, not a
        # runtime type checker's, is what a shape mistake produces.
        self._check()

    def _check(self) -> None:
        batch = self.actions.shape[0]
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.context):
            if hasattr(leaf, "shape") and (leaf.ndim == 0 or leaf.shape[0] != batch):
                raise ValueError(
                    f"Batch has {batch} action chunks but `context"
                    f"{jax.tree_util.keystr(path)}` has shape {shape_str(leaf)}; every "
                    f"context array needs a leading batch axis of size {batch}."
                )
        if self.negatives is not None and (
            self.negatives.shape[0] != batch or self.negatives.shape[2:] != self.actions.shape[1:]
        ):
            raise ValueError(
                f"`negatives` has shape {shape_str(self.negatives)}; for actions of shape "
                f"{shape_str(self.actions)} it needs shape ({batch}, num_negatives, "
                f"{', '.join(map(str, self.actions.shape[1:]))})."
            )

    @property
    def size(self) -> int:
        return self.actions.shape[0]


def take(batch: Batch, index: Any) -> Batch:
    """Rows `index` of every array of a batch (NumPy or JAX)."""
    return jax.tree.map(lambda x: x[index], batch)


def check_token_context(context: Any, name: str = "context") -> TokenContext:
    if not isinstance(context, TokenContext):
        raise TypeError(
            f"`{name}` must be a flowcorrect.TokenContext (or pass `to_context` to fit to "
            f"turn raw observations into one); got {type(context).__name__}."
        )
    return context
