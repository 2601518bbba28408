"""What a training step reads: contexts, expert chunks, optional negatives and observations."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._custom_types import Context, RealLike
from .._misc import shape_str


class Batch(eqx.Module):
    """A batch of demonstrations: contexts and the expert's action chunks.

    **Arguments:**

    - `context`: what the energy reads, with a leading batch axis on every array: a
        batched [`flowcorrect.TokenContext`][] (tokens `(batch, seq, context_dim)`, mask
        `(batch, seq)`, True = real token) for an [`flowcorrect.EnergyModel`][], state
        vectors `(batch, obs_dim)` for an [`flowcorrect.MLPEnergy`][]; or, when
        [`flowcorrect.train.fit`][] is given `to_context`, any pytree of raw observations
        with a leading batch axis, which `to_context` turns into one.
    - `actions`: the expert chunks, `(batch, horizon, action_dim)`. Single actions
        `(batch, action_dim)` are refused: make chunks of length 1 with
        `actions[:, None, :]`.
    - `negatives`: optional extra negatives for each context, `(batch, num_negatives,
        horizon, action_dim)`: e.g. chunks sampled from the policy on the same
        demonstration states, precomputed (see [`flowcorrect.train.policy_negatives`][]).
        Scored only against their own context.
    - `observation`: optional: the policy's own input for each row (any pytree with a
        leading batch axis: images and text for openpi, the state for a state-based
        policy), when it is not the energy's `context`. Only
        [`flowcorrect.train.PolicyNegatives`][] reads it; the energy never does.
    """

    context: Any
    actions: Float[Array, "batch horizon action_dim"]
    negatives: Float[Array, "batch num_negatives horizon action_dim"] | None
    observation: Any

    def __init__(
        self,
        context: Context,
        actions: RealLike,
        negatives: RealLike | None = None,
        observation: PyTree[Any] = None,
    ):
        self.context = context
        self.actions = jnp.asarray(actions)
        self.negatives = None if negatives is None else jnp.asarray(negatives)
        self.observation = observation
        # Checked here rather than in __check_init__, so that this message, not a
        # runtime type checker's, is what a shape mistake produces.
        self._check()

    def _check(self) -> None:
        if self.actions.ndim != 3:
            hint = ""
            if self.actions.ndim == 2:
                hint = (
                    f" A 2-D array {shape_str(self.actions)} is a batch of single actions "
                    "(batch, action_dim): make chunks of length 1 with actions[:, None, :]."
                )
            raise ValueError(
                "`actions` must be the expert's action chunks, shape (batch, horizon, "
                f"action_dim); got {shape_str(self.actions)}.{hint}"
            )
        batch = self.actions.shape[0]
        for name, tree in (("context", self.context), ("observation", self.observation)):
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                if hasattr(leaf, "shape") and (leaf.ndim == 0 or leaf.shape[0] != batch):
                    raise ValueError(
                        f"Batch has {batch} action chunks but `{name}"
                        f"{jax.tree_util.keystr(path)}` has shape {shape_str(leaf)}; every "
                        f"{name} array needs a leading batch axis of size {batch}."
                    )
        if self.negatives is not None and (
            self.negatives.ndim != 4
            or self.negatives.shape[0] != batch
            or self.negatives.shape[2:] != self.actions.shape[1:]
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
