"""Deterministic batch sources: batch `n` is a pure function of `n`, so resuming is exact."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .batch import Batch, take


class ShuffledBatches:
    """Batches of an in-memory data set, reshuffled each epoch, indexed by step.

    `batches(step)` returns the same batch for the same step in every run and process,
    which is what [`flowcorrect.train.fit`][] needs to resume a killed run exactly: the
    order of epoch `e` is a permutation drawn from `numpy.random.default_rng([seed, e])`,
    and a final partial batch of each epoch is dropped.

    **Arguments:**

    - `data`: a [`flowcorrect.train.Batch`][] holding the whole data set (any number of rows);
        every float array in it must be finite (a NaN or inf row is refused here, once,
        rather than skipped by [`flowcorrect.train.fit`][] at every epoch).
    - `batch_size`: rows per batch, at most the number of rows.
    - `seed`: the shuffling seed.
    """

    def __init__(self, data: Batch, batch_size: int, *, seed: int = 0):
        if not isinstance(data, Batch):
            raise TypeError(f"`data` must be a flowcorrect.train.Batch; got {type(data).__name__}.")
        if not (isinstance(batch_size, int) and 1 <= batch_size <= data.size):
            raise ValueError(
                f"`batch_size` must be an int in [1, {data.size}] (the rows of `data`); "
                f"got {batch_size!r}."
            )
        check_finite_rows(data)
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = data.size // batch_size

    def __call__(self, step: int) -> Batch:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.data.size)
        return take(self.data, order[i * self.batch_size : (i + 1) * self.batch_size])

    def __repr__(self) -> str:
        return (
            f"ShuffledBatches(rows={self.data.size}, batch_size={self.batch_size}, "
            f"seed={self.seed})"
        )


def check_finite_rows(data: Batch) -> None:
    """Refuses a data set with a NaN or inf in any float array, naming the array and
    the first bad row."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(data):
        if not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)):
            continue
        rows = _finite_rows(leaf)
        if not rows.all():
            bad = np.flatnonzero(~rows)
            raise ValueError(
                f"The data set has NaN or inf values in `Batch{jax.tree_util.keystr(path)}` "
                f"(shape {tuple(leaf.shape)}): {len(bad)} rows, the first {bad[:5].tolist()}. "
                "Drop those rows from every array of the Batch before training (or fix "
                "how they were recorded)."
            )


def _finite_rows(x: Any) -> np.ndarray:
    """Per row, whether all its values are finite; NumPy data in blocks of rows, so no
    temporary of the data set's size is made."""
    if x.ndim == 0:
        return np.asarray([bool(np.isfinite(x))])
    if isinstance(x, jax.Array):
        return np.asarray(jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1))
    x = np.asarray(x)
    out = np.ones(len(x), bool)
    block = max(1, (1 << 22) // max(1, x[0].size)) if len(x) else 1
    for i in range(0, len(x), block):
        rows = x[i : i + block]
        out[i : i + len(rows)] = np.isfinite(rows.reshape(len(rows), -1)).all(1)
    return out
