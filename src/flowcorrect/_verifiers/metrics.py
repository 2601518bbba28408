"""Rank statistics shared by the verifier report and the guidance check."""


import numpy as np
import scipy.stats

from .._custom_types import RealLike


def auc(score: RealLike, label: RealLike) -> float:
    """The area under the ROC curve of `score` predicting `label` (higher score = more
    likely positive), ties counted half: the Mann-Whitney U of the positives' scores
    against the negatives', over `n_pos * n_neg`; NaN with only one class."""
    score = np.asarray(score, np.float64)
    label = np.asarray(label, bool)
    if score.shape != label.shape or score.ndim != 1:
        raise ValueError(
            f"`score` and `label` must be 1-d of equal length; got {score.shape}, {label.shape}."
        )
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    u = scipy.stats.mannwhitneyu(score[label], score[~label], alternative="two-sided").statistic
    return float(u / (pos * neg))
