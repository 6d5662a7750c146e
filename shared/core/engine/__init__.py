"""Engine emulator core: a vLLM-v1-style continuous-batching scheduler with a KV block pool, prefix
cache and a step-time model standing in for the GPU. Pure and deterministic; time is passed in."""

from shared.core.engine.config import SchedulerConfig
from shared.core.engine.engine import Engine, StepResult
from shared.core.engine.kv_cache import KVCache
from shared.core.engine.pd import KVHandoff, KVLink
from shared.core.engine.request import FinishReason, Request, RequestStatus
from shared.core.engine.scheduler import Scheduler, StepOutput
from shared.core.engine.step_time import CalibratedStepTime, RooflineStepTime, StepTimeModel

__all__ = [
    "CalibratedStepTime",
    "Engine",
    "FinishReason",
    "KVCache",
    "KVHandoff",
    "KVLink",
    "Request",
    "RequestStatus",
    "RooflineStepTime",
    "Scheduler",
    "SchedulerConfig",
    "StepOutput",
    "StepResult",
    "StepTimeModel",
]
