"""Pieces shared by the interleaved corrections: step counts and schedule checks."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from .._flow.flow import Flow
from .._flow.schedules import AbstractSchedule


class StepCounts(eqx.Module):
    """How often an interleaved correction acted, per sample.

    **Attributes:**

    - `num_applied`: flow steps at which the correction was applied.
    - `num_skipped`: scheduled steps of nonzero weight whose correction was not finite,
        so the plain Euler step was taken instead.
    """

    num_applied: Int[Array, " batch"]
    num_skipped: Int[Array, " batch"]


def counts_init(flow: Flow) -> StepCounts:
    zero = jnp.zeros(flow.batch_size, jnp.int32)
    return StepCounts(zero, zero)


def counts_add(counts: StepCounts, on: Bool[Array, ""], applied: Bool[Array, " batch"]):
    skipped = on & jnp.logical_not(applied)
    return StepCounts(
        counts.num_applied + applied.astype(jnp.int32),
        counts.num_skipped + skipped.astype(jnp.int32),
    )


def check_schedule(schedule: Any) -> None:
    if not isinstance(schedule, AbstractSchedule):
        raise TypeError(
            "`schedule` must be a schedule such as fc.EveryStep(), fc.LastSteps(3) or "
            f"fc.EveryNth(2); got {type(schedule).__name__}."
        )


__all__ = ["StepCounts", "check_schedule", "counts_add", "counts_init"]
