"""What a generation is, as plain values shared by the engine, every backend and the gateway (no torch).

`SamplingParams` refuses values a sampler cannot run safely, and each error names the field and its
range, so a request that reaches an engine's step cannot poison it: a temperature below
`MIN_TEMPERATURE` samples greedily (its distribution is the argmax to float32 precision, and dividing
by it overflows), seeds fit 64-bit generators, penalties are finite. `RequestOutput` is what a
backend streams back for a request: deltas, then totals and metering once it ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Below this a temperature is greedy: logits / T overflows float32 long before T reaches 1e-38, and
# at 1e-5 the softmax already puts all its mass on the argmax (vLLM uses the same threshold).
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
MAX_PENALTY = 2.0
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_STOP_CHARS = 1024  # per stop string


class ParamError(ValueError):
    """A sampling parameter out of its range; `param` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or anything below MIN_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ParamError("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ParamError("temperature",
                             f"temperature must be within [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ParamError("top_k", f"top_k must be -1 or 0 (disabled) or a positive count, got {self.top_k}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ParamError("seed", f"seed must be within [-2^63, 2^64 - 1], got {self.seed}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -MAX_PENALTY <= v <= MAX_PENALTY):
                raise ParamError(name, f"{name} must be within [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ParamError("min_tokens", f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens}")
        for s in self.stop:
            if not s:
                raise ParamError("stop", "stop sequences must not be empty strings")
            if len(s) > MAX_STOP_CHARS:
                raise ParamError("stop", f"a stop sequence may be at most {MAX_STOP_CHARS} characters, got {len(s)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE



@dataclass(frozen=True)
class TextPrompt:
    """A prompt for a backend to template and tokenise itself, when the gateway has no tokenizer for its model."""

    text: str | None = None  # a completion prompt ...
    messages: tuple[dict[str, Any], ...] | None = None  # ... or a chat's messages (role, content)
    max_tokens_given: bool = True  # False: the client set no limit; the backend's own default applies

    def upper_bound_tokens(self) -> int:
        """At most this many prompt tokens: every token of a byte-level or byte-fallback vocabulary covers at
        least one byte, and a chat template adds fewer than 32 tokens per message (plus 32)."""
        if self.messages is not None:
            return sum(len(str(m.get("content", "")).encode()) + 32 for m in self.messages) + 32
        return len((self.text or "").encode()) + 2  # BOS and a leading-space token at most

    def routing_key(self) -> str:
        """The prompt as one string whose prefixes are shared exactly when the prompts' prefixes are."""
        if self.messages is not None:
            return "".join(f"<{m.get('role')}>{m.get('content', '')}" for m in self.messages)
        return self.text or ""


class RequestError(ValueError):
    """A request a backend cannot run as asked (too long for the context or the cache); 400 at HTTP."""


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (deltas), plus totals once it finishes."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    time_s: float  # monotonic time at which this output was produced
    metering: RequestMetering | None = None  # set on the final output
    error: str | None = None  # set on the final output of a request the engine failed (finish_reason "error")
    served_by: str | None = None  # set on the final output by a router: the backend that made the tokens


@dataclass(frozen=True)
class RequestMetering:
    """Per-request timings (seconds, engine clock) and attributed energy, reported when it ends."""

    arrival_s: float
    queue_s: float | None  # arrival -> first scheduled
    ttft_s: float | None  # arrival -> first token
    tpot_s: float | None  # (last token - first token) / (tokens - 1)
    itl_p50_s: float | None
    itl_p99_s: float | None
    itl_max_s: float | None
    e2e_s: float  # arrival -> end
    joules: float
    device_s: float
    num_preemptions: int
    energy_source: str | None = None  # where `joules` came from, when a backend's own (None: the server's source)
