"""The interface that training, evaluation and saving need from a learned energy."""

import abc
import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray, PyTree

from .._custom_types import Actions, Context, Encoded, Scalar
from .._energy import AbstractEnergy

Embedded = PyTree[Any]


@dataclasses.dataclass(frozen=True)
class LearnedEnergyConfig:
    """Base class of the configuration of a learned energy: a frozen dataclass of JSON
    values that fixes the architecture (every shape) of the model built from it.

    Subclasses add their fields as dataclass fields and check them in `__post_init__`.
    [`flowcorrect.save_model`][] stores `to_dict()`; [`flowcorrect.load_model`][]
    rebuilds the config with `from_dict`, which refuses unknown and missing fields, so
    a file edited by hand or written by another version is an error, never a silent
    fallback to a default.
    """

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict of JSON values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """Rebuilds a config from `to_dict`'s output; unknown or missing keys are errors."""
        if not isinstance(data, dict):
            raise ValueError(f"A {cls.__name__} is a JSON object; got {type(data).__name__}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        missing = sorted(fields - set(data))
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown fields {unknown}")
            if missing:
                parts.append(f"missing fields {missing}")
            raise ValueError(
                f"{cls.__name__} has {' and '.join(parts)}: the file was written by another "
                "version of flowcorrect, or edited by hand. Save the model again."
            )
        return cls(**data)


class AbstractLearnedEnergy(AbstractEnergy):
    """A trainable energy: what [`flowcorrect.train.fit`][], [`flowcorrect.train.evaluate`][],
    [`flowcorrect.train.energy_matrix`][] and [`flowcorrect.save_model`][] work on.

    The energy splits in three, so that InfoNCE can score all `B x M` pairs of a batch
    while encoding each of the `B` contexts once and embedding each of the `M` chunks
    once (never copying a context per chunk):

    - `encode(context)`: the work on one observation's context alone;
    - `embed_actions(actions, *, key=None)`: the work on one chunk alone (`key` for
        dropout, in training mode);
    - `score_embedded(encoded, embedded)`: the scalar energy of one pair; this is the
        only part run per pair, so keep it cheap.

    `score(encoded, actions)` and calling the energy compose them, so a learned energy
    is an ordinary [`flowcorrect.EnergyFn`][] for [`flowcorrect.correct`][] and
    [`flowcorrect.sample`][]. Batching is `jax.vmap` outside: every method takes one
    observation and one chunk.

    Subclasses also define `config` (a field: an instance of a
    [`flowcorrect.LearnedEnergyConfig`][] subclass holding every architecture choice,
    as JSON values) and the class variable `config_class` (that subclass), and are
    built as `cls(config, *, key)`: that is how [`flowcorrect.load_model`][] rebuilds
    a saved model before reading its weights.

    [`flowcorrect.EnergyModel`][] (cross-attention over a policy's context tokens) and
    [`flowcorrect.MLPEnergy`][] (an MLP over a state vector) are the two shipped.
    """

    config: eqx.AbstractVar[LearnedEnergyConfig]
    config_class: eqx.AbstractClassVar[type[LearnedEnergyConfig]]

    @abc.abstractmethod
    def encode(self, context: Context) -> Encoded:
        """Encodes the context of one observation: done once, reused by every score."""

    @abc.abstractmethod
    def embed_actions(self, actions: Actions, *, key: PRNGKeyArray | None = None) -> Embedded:
        """Embeds one action chunk `(horizon, action_dim)`: the part of `score` that does
        not read the context. `key` is for dropout, needed only in training mode."""

    @abc.abstractmethod
    def score_embedded(self, encoded: Encoded, embedded: Embedded) -> Scalar:
        """The energy of an embedded chunk given an encoded context (float32)."""

    def score(
        self, encoded: Encoded, actions: Actions, *, key: PRNGKeyArray | None = None
    ) -> Scalar:
        """The energy of one action chunk given an encoded context.

        **Arguments:**

        - `encoded`: the output of `encode`.
        - `actions`: one chunk, `(horizon, action_dim)`.
        - `key`: a PRNG key for dropout; needed only in training mode.

        **Returns:**

        A scalar in the dtype of `actions`: low means the chunk is plausible.
        """
        out = self.score_embedded(encoded, self.embed_actions(actions, key=key))
        return out.astype(actions.dtype)

    def num_parameters(self) -> int:
        """The number of trainable parameters."""
        return sum(x.size for x in jax.tree.leaves(eqx.filter(self, eqx.is_inexact_array)))


def check_chunk(owner: str, actions: Any, horizon: int | None, action_dim: int) -> None:
    """A clear error for an action chunk of the wrong shape (at trace time)."""
    shape = getattr(actions, "shape", None)
    if shape is None:
        raise TypeError(
            f"{owner} scores an action chunk, an array of shape (horizon, {action_dim}); "
            f"got {type(actions).__name__}."
        )
    want_h = "horizon" if horizon is None else str(horizon)
    ok = len(shape) == 2 and shape[-1] == action_dim and (horizon is None or shape[0] == horizon)
    if ok:
        if not jnp.issubdtype(actions.dtype, jnp.floating):
            raise ValueError(f"{owner}: actions must be floating point; got {actions.dtype}.")
        return
    hint = ""
    if len(shape) == 2 and shape[-1] == action_dim:
        hint = (
            f" A 2-D array is read as ONE chunk of {shape[0]} steps; if these are "
            f"{shape[0]} single actions (one per observation), make chunks of length 1 "
            "with actions[:, None, :] and vmap over the batch."
        )
    elif len(shape) == 3:
        hint = " That looks like a batch of chunks: score one chunk at a time (jax.vmap)."
    elif len(shape) >= 1 and shape[-1] != action_dim:
        hint = (
            f" This model was built for action_dim={action_dim}: slice the actions (openpi "
            "pads to 32) or use a model built for this action dimension."
        )
    raise ValueError(
        f"{owner} scores one action chunk of shape ({want_h}, {action_dim}); got "
        f"{tuple(shape)}.{hint}"
    )


__all__ = ["AbstractLearnedEnergy", "Embedded", "LearnedEnergyConfig", "check_chunk"]
