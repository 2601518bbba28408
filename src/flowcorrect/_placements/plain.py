"""The plain Euler step: the policy on its own."""

from .._flow.flow import BatchChunks, Flow
from .base import AbstractInterleaved


class Plain(AbstractInterleaved):
    """The plain Euler step, no correction: what the policy does on its own.

    The default inner placement of [`flowcorrect.BestOfN`][] and
    [`flowcorrect.PostHoc`][]; in [`flowcorrect.sample`][] it is what no placement
    means. With an energy and `step_energies=True` it records the energy along the
    uncorrected flow.
    """

    needs_energy = False

    def init(self, flow: Flow, x: BatchChunks) -> None:
        return None

    def step(self, flow, x, t, dt, index, state, keys):
        v = flow.velocity(x, t)
        return x + dt * v, v, None

    def info(self, flow: Flow, state: None) -> None:
        return None


__all__ = ["Plain"]
