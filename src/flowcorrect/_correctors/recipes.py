
import numpy as np

from .._custom_types import IndexLike, RealLike
from .base import AbstractCorrector
from .steps import GradientStep
from .wrappers import ClipStep, Mask, Repeat


def reference_recipe(
    num_steps: int = 3,
    alpha: RealLike = 0.1,
    clip_frac: RealLike = 0.2,
    *,
    first_only: bool = False,
    action_dims: IndexLike | None = None,
) -> AbstractCorrector:
    """The reference method's corrector: K clipped gradient steps.

    `Repeat(ClipStep(GradientStep(alpha), clip_frac), num_steps)`, with a
    [`flowcorrect.Mask`][] around the gradient step when `first_only` or `action_dims`
    is given. Each step is `a <- a - alpha * grad_a E`, scaled down so that
    `||step|| <= clip_frac * ||a||` for the chunk entering the step. Defaults K = 3,
    alpha = 0.1, clip_frac = 0.2.

    **Arguments:**

    - `num_steps`: K, the number of steps (0 = off, 1-3 real-time, 5-10 stronger).
    - `alpha`: the step size.
    - `clip_frac`: the largest step as a fraction of the chunk's norm.
    - `first_only`: correct only the first action of the chunk.
    - `action_dims`: correct only the first `action_dims` action dimensions (7 for
        LIBERO inside openpi's 32 padded dimensions), or a boolean array of shape
        `(action_dim,)`; `None` corrects all.

    **Returns:**

    An [`flowcorrect.AbstractCorrector`][] for [`flowcorrect.correct`][].
    """
    step: AbstractCorrector = GradientStep(alpha)
    if not isinstance(first_only, bool | np.bool_):
        raise TypeError(
            f"reference_recipe `first_only` must be True or False; got {first_only!r}. "
            "For the first k actions use fc.Mask(..., horizon=k)."
        )
    if first_only or action_dims is not None:
        step = Mask(step, horizon=1 if first_only else None, action_dims=action_dims)
    return Repeat(ClipStep(step, clip_frac), num_steps=num_steps)
