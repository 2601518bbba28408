from typing import Any

from .base import AbstractCorrector
from .steps import GradientStep
from .wrappers import ActionDimMask, ClipStep, HorizonMask, Repeat


def reference_recipe(
    num_steps: int = 3,
    alpha: Any = 0.1,
    clip_frac: Any = 0.2,
    *,
    first_only: bool = False,
    action_dims: int | None = None,
) -> AbstractCorrector:
    """The reference method's corrector: K clipped gradient steps.

    `Repeat(ClipStep(GradientStep(alpha), clip_frac), num_steps)`: each step is
    `a <- a - alpha * grad_a E`, scaled down so that `||step|| <= clip_frac * ||a||`
    for the chunk entering the step. Defaults K = 3, alpha = 0.1, clip_frac = 0.2.

    **Arguments:**

    - `num_steps`: K, the number of steps (0 = off, 1-3 real-time, 5-10 stronger).
    - `alpha`: the step size.
    - `clip_frac`: the largest step as a fraction of the chunk's norm.
    - `first_only`: correct only the first action of the chunk.
    - `action_dims`: correct only the first `action_dims` action dimensions (7 for
        LIBERO inside openpi's 32 padded dimensions); `None` corrects all.

    **Returns:**

    An [`flowcorrect.AbstractCorrector`][] for [`flowcorrect.correct`][].
    """
    step: AbstractCorrector = GradientStep(alpha)
    if first_only:
        step = HorizonMask(step, first=1)
    if action_dims is not None:
        step = ActionDimMask(step, first=action_dims)
    return Repeat(ClipStep(step, clip_frac), num_steps=num_steps)
