"""Progress meters of the training loop: how a run shows where it is."""

import abc
from typing import Any

import equinox as eqx


class AbstractProgressMeter(eqx.Module):
    """How [`flowcorrect.train.fit`][] shows its progress, on the host, between steps.

    `fit` calls `init` once before the first step, `step` after every step (with the
    latest logged metrics at each logging step, `None` otherwise) and `close` once at
    the end, also when the run raises. The meter's state is whatever `init` returns.
    """

    @abc.abstractmethod
    def init(self, *, total: int, initial: int, desc: str) -> Any:
        """Starts a meter for a run of `total` steps of which `initial` are done (a
        resumed run); `desc` names the run (`"fit"`, `"fit_verifier"`). Returns the
        meter's state."""

    @abc.abstractmethod
    def step(self, state: Any, postfix: dict[str, str] | None) -> Any:
        """One more step done; `postfix` holds the metrics to show, formatted, at a
        logging step and is `None` otherwise. Returns the new state."""

    @abc.abstractmethod
    def close(self, state: Any) -> None:
        """Ends the meter."""


class NoProgressMeter(AbstractProgressMeter):
    """Shows nothing (`fit(..., progress=False)`)."""

    def init(self, *, total: int, initial: int, desc: str) -> None:
        return None

    def step(self, state: None, postfix: dict[str, str] | None) -> None:
        return None

    def close(self, state: None) -> None:
        pass


class TqdmProgressMeter(AbstractProgressMeter):
    """A tqdm progress bar (`fit(..., progress=True)`, the default) with the metrics
    of the latest logging interval after it.

    **Arguments:**

    - `leave`: keep the finished bar on the screen. Default `False`.
    """

    leave: bool = eqx.field(default=False, static=True)

    def init(self, *, total: int, initial: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=self.leave)

    def step(self, state: Any, postfix: dict[str, str] | None) -> Any:
        state.update(1)
        if postfix is not None:
            state.set_postfix(**postfix)
        return state

    def close(self, state: Any) -> None:
        state.close()


def progress_meter(progress: Any) -> AbstractProgressMeter:
    """`True` is a tqdm bar, `False` none; a meter is used as it is."""
    if isinstance(progress, AbstractProgressMeter):
        return progress
    if isinstance(progress, bool):
        return TqdmProgressMeter() if progress else NoProgressMeter()
    raise TypeError(
        "`progress` must be True (a tqdm bar), False (none) or an "
        f"fc.train.AbstractProgressMeter; got {type(progress).__name__}."
    )
