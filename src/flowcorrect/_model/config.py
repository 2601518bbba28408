"""The configuration of an energy model: everything needed to rebuild its shapes."""

import dataclasses
from typing import Literal

from .._misc import is_int
from .base import LearnedEnergyConfig


@dataclasses.dataclass(frozen=True)
class EnergyModelConfig(LearnedEnergyConfig):
    """The architecture of an [`flowcorrect.EnergyModel`][], serialisable to JSON.

    **Arguments:**

    - `context_dim`: the width of the context tokens (2048 for openpi's PaliGemma prefix).
    - `action_dim`: the action dimension of a chunk (7 for LIBERO's arm, 32 for
        openpi's padded actions).
    - `hidden`: the model width. Default 512.
    - `num_heads`: attention heads; must divide `hidden`. Default 8.
    - `context_blocks`, `action_blocks`, `head_blocks`: residual blocks in the context,
        action and head MLP-ResNets. Default 1 each.
    - `block_width`: the inner width of a residual block; `None` (default) is
        `hidden // 4`. With the defaults and `context_dim=2048` the model has about
        2.5M parameters (see `EnergyModel.num_parameters`).
    - `dropout`: dropout rate on the embedded action chunk, applied in training only.
        Default 0.1.
    - `energy`: `"unbounded"` (default): the energy is the head's output; or
        `"bounded"`: the reference's `sigmoid(0.5 * head) * 2.0 + 0.1`, in
        `[0.1, 2.1]`. The bounded form's gradient vanishes once the head saturates;
        see the model docs for where, measured.
    - `context_pool`: average the encoded context tokens over windows of this many
        tokens (padding excluded) before attention; 1 (default) keeps every token.
        openpi's prefix has ~800 tokens: a window of 8 makes attention ~8x cheaper.
    - `spectral_norm`: spectrally normalise the linear layers between the actions and
        the energy (action MLP, attention queries and output, head). Default off.
    - `power_iterations`: power-iteration steps (>= 1) used to estimate each spectral
        norm, in every spectrally normalised layer. Default 5.
    """

    context_dim: int
    action_dim: int
    hidden: int = 512
    num_heads: int = 8
    context_blocks: int = 1
    action_blocks: int = 1
    head_blocks: int = 1
    block_width: int | None = None
    dropout: float = 0.1
    energy: Literal["unbounded", "bounded"] = "unbounded"
    context_pool: int = 1
    spectral_norm: bool = False
    power_iterations: int = 5

    def __post_init__(self):
        positive = (
            "context_dim", "action_dim", "hidden", "num_heads", "context_pool", "power_iterations"
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                raise ValueError(f"`{name}` must be an int >= 1; got {value!r}.")
        for name in ("context_blocks", "action_blocks", "head_blocks"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 0):
                raise ValueError(f"`{name}` must be an int >= 0; got {value!r}.")
        if self.block_width is not None and not (
            isinstance(self.block_width, int) and self.block_width >= 1
        ):
            raise ValueError(
                f"`block_width` must be None or an int >= 1; got {self.block_width!r}."
            )
        if self.hidden % self.num_heads != 0:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) must divide `hidden` ({self.hidden}); "
                f"e.g. hidden={self.num_heads * max(1, self.hidden // self.num_heads)}."
            )
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ValueError(f"`dropout` must be a rate in [0, 1); got {self.dropout!r}.")
        if self.energy not in ("unbounded", "bounded"):
            raise ValueError(f"`energy` must be 'unbounded' or 'bounded'; got {self.energy!r}.")
        if not isinstance(self.spectral_norm, bool):
            raise ValueError(f"`spectral_norm` must be a bool; got {self.spectral_norm!r}.")

    @property
    def width(self) -> int:
        """The inner width of the residual blocks."""
        return self.block_width if self.block_width is not None else max(1, self.hidden // 4)
