"""Embedded inference engine: paged KV cache, continuous batching, chunked prefill, prefix caching."""

from tokenfab.engine.config import EngineConfig
from tokenfab.engine.sampling import SamplingParams

__all__ = ["EngineConfig", "SamplingParams"]
