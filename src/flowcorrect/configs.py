"""Placements as configs: one frozen dataclass per placement, each setting declared once
with its default and its range, read by command lines (tyro) and by a served policy's
per-request options alike.

    import flowcorrect as fc

    config = fc.configs.BestOfNConfig(n=8, select="medoid")
    placement = config.check({"max_candidates": 64}).build()  # fc.BestOfN(8, Medoid())
    same = fc.configs.from_options({"placement": "best_of_n", "n": 8, "select": "medoid"})
"""

from ._configs import (
    PLACEMENT_CONFIGS as PLACEMENT_CONFIGS,
    AbstractPlacementConfig as AbstractPlacementConfig,
    BestOfNConfig as BestOfNConfig,
    Bound as Bound,
    ConfigError as ConfigError,
    DenoisedConfig as DenoisedConfig,
    FeasibleConfig as FeasibleConfig,
    GuidedConfig as GuidedConfig,
    OffConfig as OffConfig,
    PlacementConfig as PlacementConfig,
    PostHocConfig as PostHocConfig,
    RTCConfig as RTCConfig,
    TRTConfig as TRTConfig,
    from_options as from_options,
    option as option,
)

__all__ = [
    "PLACEMENT_CONFIGS",
    "AbstractPlacementConfig",
    "BestOfNConfig",
    "Bound",
    "ConfigError",
    "DenoisedConfig",
    "FeasibleConfig",
    "GuidedConfig",
    "OffConfig",
    "PlacementConfig",
    "PostHocConfig",
    "RTCConfig",
    "TRTConfig",
    "from_options",
    "option",
]
