"""Correction of the finished chunk: the reference method."""

from typing import Any

import equinox as eqx
from jaxtyping import Array, Float, PyTree

from .._correct import CorrectionInfo
from .._correctors.base import AbstractCorrector, check_is_corrector
from .._correctors.recipes import reference_recipe
from .._flow.flow import BatchChunks, BatchKeys, Flow, split_keys
from .._misc import MISSING, renamed, renamed_attribute
from .base import AbstractPlacement, check_placement, step_energy_of
from .plain import Plain


class PostHocInfo(eqx.Module):
    """Diagnostics of [`flowcorrect.PostHoc`][].

    **Attributes:**

    - `correction`: the [`flowcorrect.CorrectionInfo`][] of the correction.
    - `inner`: the diagnostics of the placement that produced the chunk.
    """

    correction: CorrectionInfo
    inner: PyTree[Any]

    @property
    def step_energy(self) -> Float[Array, "batch num_steps"] | None:
        """The inner placement's step energies (before the correction), or `None`."""
        return step_energy_of(self.inner)

    @property
    def after(self) -> Any:
        """Deprecated name of `inner`."""
        return renamed_attribute("PostHocInfo", "after", "inner", self.inner)


class PostHoc(AbstractPlacement):
    """Runs a corrector on the finished chunk: the reference method.

    [`flowcorrect.correct`][] applied to the sample, after the flow ODE (or after any
    other placement: `PostHoc(corrector, inner=fc.BestOfN(8))`).

    !!! warning

        In every closed-loop evaluation here, post-hoc gradient steps on an energy
        trained on the policy's own demonstrations lowered task success (78 to 54 and
        70 to 21 of 100 on two Meta-World tasks). Measure before deploying it.

    **Arguments:**

    - `corrector`: defaults to [`flowcorrect.reference_recipe`][].
    - `inner`: the placement producing the chunk; defaults to [`flowcorrect.Plain`][].
        (`after`, its name before, still works for one release, with a
        `DeprecationWarning`.)
    """

    corrector: AbstractCorrector
    inner: AbstractPlacement
    # The corrector descends the energy, whatever produced the chunk.
    needs_energy = True

    # Arguments typed loosely so that a wrong one gets the message of `__check_init__`.
    def __init__(
        self,
        corrector: AbstractCorrector = reference_recipe(),
        inner: AbstractPlacement = MISSING,
        *,
        after: AbstractPlacement = MISSING,
    ):
        inner = renamed("PostHoc", "inner", inner, "after", after, Plain())
        # Checked before the fields are set too, for openpi's older jaxtyping (see BestOfN).
        check_is_corrector("PostHoc", "corrector", corrector)
        check_placement(inner, "PostHoc `inner`")
        self.corrector = corrector
        self.inner = inner

    def __check_init__(self):
        check_is_corrector("PostHoc", "corrector", self.corrector)
        check_placement(self.inner, "PostHoc `inner`")

    @property
    def after(self) -> AbstractPlacement:
        """Deprecated name of `inner`."""
        return renamed_attribute("PostHoc", "after", "inner", self.inner)

    def noise_shape(self, chunk_shape: tuple[int, int]) -> tuple[int, ...]:
        return self.inner.noise_shape(chunk_shape)

    def sample(self, flow: Flow, noise: Array, keys: BatchKeys) -> tuple[BatchChunks, PostHocInfo]:
        flow.require_energy("PostHoc")
        inner_keys, correct_keys = split_keys(keys, 2)
        x, inner_info = self.inner.sample(flow, noise, inner_keys)
        out, info = flow.correct(x, self.corrector, correct_keys, "PostHoc")
        return out, PostHocInfo(info, inner_info)


__all__ = ["PostHoc", "PostHocInfo"]
