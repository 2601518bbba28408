"""Real-time chunking: inference-time guidance, training-time prefix conditioning,
and the executor's action queue and latency tracking."""

from ._executor import (
    ActionQueue as ActionQueue,
    ChunkArrival as ChunkArrival,
    ChunkRequest as ChunkRequest,
    LatencyTracker as LatencyTracker,
)
from ._placements.rtc import (
    RealTimeChunking as RealTimeChunking,
    RealTimeChunkingInfo as RealTimeChunkingInfo,
)
from ._rtc import (
    PiGDMWeight as PiGDMWeight,
    RTCEnergy as RTCEnergy,
    rtc_prefix_weights as rtc_prefix_weights,
)
from ._rtc_training import (
    AbstractDelays as AbstractDelays,
    ConditionedExample as ConditionedExample,
    ExponentialDelays as ExponentialDelays,
    PrefixConditioned as PrefixConditioned,
    PrefixConditionedRTC as PrefixConditionedRTC,
    PrefixConditioning as PrefixConditioning,
    UniformDelays as UniformDelays,
    accepts_token_time as accepts_token_time,
    clean_time as clean_time,
    masked_flow_loss as masked_flow_loss,
    prefix_conditioned_loss as prefix_conditioned_loss,
    token_times as token_times,
)

__all__ = [
    "AbstractDelays",
    "accepts_token_time",
    "ActionQueue",
    "ChunkArrival",
    "ChunkRequest",
    "clean_time",
    "ConditionedExample",
    "ExponentialDelays",
    "LatencyTracker",
    "masked_flow_loss",
    "PiGDMWeight",
    "prefix_conditioned_loss",
    "PrefixConditioned",
    "PrefixConditionedRTC",
    "PrefixConditioning",
    "RealTimeChunking",
    "RealTimeChunkingInfo",
    "rtc_prefix_weights",
    "RTCEnergy",
    "token_times",
    "UniformDelays",
]
