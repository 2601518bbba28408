"""Training objectives of the loop: what one step minimises on one batch."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .._correctors.base import AbstractCorrector
from .._model.base import AbstractLearnedEnergy
from .batch import Batch
from .infonce import info_nce
from .negatives import AbstractNegatives, make_negatives
from .report import EvalReport, evaluate


class AbstractLoss(eqx.Module):
    """A training objective of [`flowcorrect.train.fit`][]: the loop calls
    `loss(model, batch, key)` inside its compiled step, differentiates the first
    output with respect to the model's float arrays and applies the optimiser; it
    never asks which loss it has.

    Subclass it for your own objective; [`flowcorrect.train.InfoNCELoss`][] (demonstrations)
    and [`flowcorrect.verifiers.AbstractVerifierLoss`][] (rollouts) are the library's.
    """

    @abc.abstractmethod
    def __call__(
        self, model: AbstractLearnedEnergy, batch: Any, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, Array]]:
        """The scalar loss on `batch` and a dict of scalar metrics (for the history,
        averaged over each logging interval). `key` is a function of the step, so a
        resumed run draws what the uninterrupted one did."""

    @abc.abstractmethod
    def postfix(self, entry: dict[str, Any]) -> dict[str, str]:
        """What the progress meter shows of one history entry: names to formatted
        values."""


class InfoNCELoss(AbstractLoss):
    """InfoNCE over all pairs of a [`flowcorrect.train.Batch`][] of demonstrations, plus
    extra negatives: [`flowcorrect.train.info_nce`][] with the batch's own
    `Batch.negatives` followed by those drawn by `negatives`.

    The key of a step is split in two: one for the negatives, one for the loss
    (dropout). Metrics: those of [`flowcorrect.train.info_nce`][].

    **Arguments:**

    - `tau`, `grad_penalty`, `grad_margin`, `pair_chunk`: as in
        [`flowcorrect.train.info_nce`][]. Defaults `0.5`, `0.1`, `0.0`, `None`.
    - `negatives`: generators of extra negatives ([`flowcorrect.train.NoiseNegatives`][],
        [`flowcorrect.train.PolicyNegatives`][], ...), appended to `Batch.negatives`.
    - `to_context`: turns `Batch.context` (raw observations) into what the model's
        `encode` reads, batched, under `stop_gradient` (e.g. the frozen policy's prefix
        pass); `None` if batches hold contexts already.
    """

    tau: float = 0.5
    grad_penalty: float = 0.1
    grad_margin: float = 0.0
    pair_chunk: int | None = eqx.field(default=None, static=True)
    negatives: tuple[AbstractNegatives, ...] = eqx.field(default=(), converter=tuple)
    to_context: Callable[[Any], Any] | None = None

    def __check_init__(self):
        for n in self.negatives:
            if not isinstance(n, AbstractNegatives):
                raise TypeError(
                    f"`negatives` must hold AbstractNegatives; got {type(n).__name__}."
                )

    def __call__(
        self, model: AbstractLearnedEnergy, batch: Batch, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, Array]]:
        if not isinstance(batch, Batch):
            raise TypeError(
                f"`data` gave a {type(batch).__name__}; InfoNCE training reads "
                "flowcorrect.train.Batch objects."
            )
        k_neg, k_loss = jax.random.split(key)
        context = batch.context
        if self.to_context is not None:
            context = jax.lax.stop_gradient(self.to_context(context))
        extra = make_negatives(
            self.negatives, k_neg, context, batch.actions, batch.observation
        )
        if batch.negatives is not None:
            given = batch.negatives.astype(batch.actions.dtype)
            extra = given if extra is None else jnp.concatenate([given, extra], axis=1)
        return info_nce(
            model,
            context,
            batch.actions,
            tau=self.tau,
            extra_negatives=extra,
            grad_penalty=self.grad_penalty,
            grad_margin=self.grad_margin,
            pair_chunk=self.pair_chunk,
            key=k_loss,
        )

    def postfix(self, entry: dict[str, Any]) -> dict[str, str]:
        return {
            "loss": f"{entry['loss']:.3f}",
            "top1": f"{entry['top1_accuracy']:.2f}",
            "pairwise": f"{entry['pairwise_accuracy']:.2f}",
            "E_pos": f"{entry['e_pos']:.3f}",
            "E_neg": f"{entry['e_neg']:.3f}",
        }

    def evaluate(
        self,
        model: AbstractLearnedEnergy,
        held_out: Batch,
        policy_samples: Array | None = None,
        corrector: AbstractCorrector | None = None,
    ) -> EvalReport:
        """[`flowcorrect.train.evaluate`][] with this loss's `tau`, `pair_chunk` and
        `to_context`."""
        return evaluate(
            model,
            held_out,
            policy_samples=policy_samples,
            corrector=corrector,
            tau=self.tau,
            pair_chunk=self.pair_chunk,
            to_context=self.to_context,
        )
