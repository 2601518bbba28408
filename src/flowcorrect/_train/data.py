"""Deterministic batch sources: batch `n` is a pure function of `n`, so resuming is exact."""

from typing import Any

import jax
import numpy as np

from .batch import Batch, take


class ShuffledBatches:
    """Batches of an in-memory data set, reshuffled each epoch, indexed by step.

    `batches(step)` returns the same batch for the same step in every run and process,
    which is what [`flowcorrect.fit`][] needs to resume a killed run exactly: the
    order of epoch `e` is a permutation drawn from `numpy.random.default_rng([seed, e])`,
    and a final partial batch of each epoch is dropped.

    **Arguments:**

    - `data`: a [`flowcorrect.Batch`][] holding the whole data set (any number of rows).
    - `batch_size`: rows per batch, at most the number of rows.
    - `seed`: the shuffling seed.
    """

    def __init__(self, data: Batch, batch_size: int, *, seed: int = 0):
        if not isinstance(data, Batch):
            raise TypeError(f"`data` must be a flowcorrect.Batch; got {type(data).__name__}.")
        if not (isinstance(batch_size, int) and 1 <= batch_size <= data.size):
            raise ValueError(
                f"`batch_size` must be an int in [1, {data.size}] (the rows of `data`); "
                f"got {batch_size!r}."
            )
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


def to_host(tree: Any) -> Any:
    """A pytree of arrays as NumPy arrays on the host."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
