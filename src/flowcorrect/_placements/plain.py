"""The plain Euler step: the policy on its own."""

from .._flow.flow import BatchChunks, Flow
from .base import AbstractInterleaved


class Plain(AbstractInterleaved):
    """The plain Euler step, no correction: what the policy does on its own.

    The default inner placement of [`flowcorrect.BestOfN`][] and
    [`flowcorrect.PostHoc`][], and [`flowcorrect.sample`][]'s default. Passed
    explicitly with an energy, `fc.sample(..., energy=e, placement=fc.Plain())` scores
    the plain chunks (`info.final_energy`; with `step_energies=True`, the energy along
    the uncorrected flow); an energy with the default placement is an error, since
    nothing would correct with it.
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
