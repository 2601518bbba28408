"""Verifiers from the policy's own rollouts: recording, training, reports."""

from ._verifiers.report import (
    VerifierReport as VerifierReport,
    auc as auc,
    candidate_energies as candidate_energies,
    verifier_report as verifier_report,
)
from ._verifiers.rollouts import (
    Rollouts as Rollouts,
    RolloutWriter as RolloutWriter,
    load_rollouts as load_rollouts,
)
from ._verifiers.train import (
    AbstractVerifierLoss as AbstractVerifierLoss,
    BradleyTerryLoss as BradleyTerryLoss,
    LabelledBatch as LabelledBatch,
    OutcomeLoss as OutcomeLoss,
    PairBatch as PairBatch,
    fit_verifier as fit_verifier,
    outcome_batches as outcome_batches,
    pair_batches as pair_batches,
    similar_state_pairs as similar_state_pairs,
)

__all__ = [
    "AbstractVerifierLoss",
    "auc",
    "BradleyTerryLoss",
    "candidate_energies",
    "fit_verifier",
    "LabelledBatch",
    "load_rollouts",
    "outcome_batches",
    "OutcomeLoss",
    "pair_batches",
    "PairBatch",
    "Rollouts",
    "RolloutWriter",
    "similar_state_pairs",
    "verifier_report",
    "VerifierReport",
]
