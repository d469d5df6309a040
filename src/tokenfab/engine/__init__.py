"""Embedded inference engine: paged KV cache, continuous batching, chunked prefill, prefix caching."""

from tokenfab.engine.config import EngineConfig
from tokenfab.generation import SamplingParams  # pure: importing the package pulls in no torch

__all__ = ["EngineConfig", "SamplingParams"]
