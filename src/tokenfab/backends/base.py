"""The Backend seam: the one async interface between the gateway and any engine (no torch, no web framework).

Shaped like vLLM's `EngineClient`. A backend generates (streamed `RequestOutput` deltas, the last one
with totals and metering), aborts, says whether a request fits, describes its model, reports its
load and health, and declares what it can do. Where it has a tokenizer of its own (`tokenizer`), the
gateway counts and templates prompts with it; where it has a step-time model (`step_model`), the
gateway's admission predicts TTFT with it. The gateway imports only this module; each implementation
lives beside it, and only `embedded` imports `tokenfab.engine`.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenfab.generation import RequestOutput, SamplingParams, TextPrompt
from tokenfab.step_model import StepTimeModel


@dataclass(frozen=True)
class Capabilities:
    """What a backend can honour; the gateway refuses (400, naming the field) what it cannot."""

    local_tokenizer: bool = False  # prompts can be counted and templated in the gateway's process
    text_prompts: bool = False  # takes prompts as text or chat messages and templates and tokenises them itself
    tools: bool = False
    json_schema: bool = False
    logprobs: bool = False
    priority: bool = False  # honours a per-request priority (tier scheduling)
    trust: str = "external"  # "local": runs in or beside this process; "external": someone else's server


@dataclass(frozen=True)
class ModelInfo:
    """The model a backend serves, as /v1/models shows it."""

    name: str
    max_model_len: int
    synthetic: bool = False  # random weights: the text is noise, the compute per token is real
    source: str = ""
    quantization: str = ""
    dtype: str = ""


@dataclass(frozen=True)
class LoadSnapshot:
    """A backend's load at one moment, for admission, routing and /health."""

    running: int
    waiting: int
    in_flight: int  # requests the backend holds (running, waiting, or about to be added)
    kv_cache_usage: float  # fraction of the KV cache in use, 0..1
    steps: int = 0
    step_ewma_ms: float | None = None
    prefix_cache_hit_rate: float | None = None
    ttft_ewma_ms: float | None = None  # recent time to first token, as the gateway saw it
    tpot_ewma_ms: float | None = None  # recent time per output token after the first
    metrics_age_s: float | None = None  # how old the scraped numbers are (None: not scraped, known first-hand)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class EnergyInfo:
    """Where a backend's joules come from: `source` labels every usage record; `measured` is False for a model."""

    source: str = "none"
    measured: bool = False


class BackendError(RuntimeError):
    """A backend failed a request. `retryable`: the backend (not the request) is at fault, so another
    backend may serve it; `started`: output had already reached the caller (never retried then)."""

    def __init__(self, message: str, retryable: bool, started: bool = False, status: int = 502) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.started = started
        self.status = status


class NoBackendAvailable(RuntimeError):
    """No backend can take the request now (all down or ejected); a 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PromptTokenizer(Protocol):
    """What the gateway needs of a backend's tokenizer; calls may take long and run on a worker thread."""

    @property
    def max_token_bytes(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...


class Backend(abc.ABC):
    """One engine behind the gateway. Lifecycle: `start()` (or `run()` on the calling thread), `shutdown()`;
    inside the server's event loop, `open()` once it runs and `aclose()` before it stops."""

    name: str = "embedded"
    info: ModelInfo
    capabilities: Capabilities
    energy: EnergyInfo = EnergyInfo()
    tokenizer: PromptTokenizer | None = None
    step_model: StepTimeModel | None = None
    max_num_seqs: int = 1
    max_num_batched_tokens: int = 1
    vocab_size: int = 0  # prompt token ids must be below this (0: unknown)
    kv_cache_tokens: int = 0  # KV-cache capacity in tokens (0: unknown); a router sizes its prefix index by it

    def __init__(self) -> None:
        self._stopped = threading.Event()
        self.healthy = True
        self.last_error: str | None = None

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 priority: int = 0, tier: str | None = None,
                 text: TextPrompt | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; closing the iterator early aborts the request. `priority`: lower
        runs first (the tier's rank); `tier`: the tier's name, for backends that route by it; `text`:
        instead of `prompt_ids` (then empty), a prompt for a backend that templates and tokenises
        itself (only where `capabilities.text_prompts`). Raises `BackendError` for a failure of the
        backend's own."""

    @abc.abstractmethod
    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Raise `RequestError` (a 400) if the request cannot run as asked."""

    @abc.abstractmethod
    def load(self) -> LoadSnapshot: ...

    def health(self) -> dict[str, Any]:
        """Backend-specific details for /health (kernels, step model, ...)."""
        return {}

    def mark_failed(self, error: str) -> None:
        """Passive health: a request found this backend broken; it takes no new requests until a check passes."""
        self.healthy = False
        self.last_error = error

    async def open(self) -> None:
        """Start any work of the backend's own in the server's event loop (load polling, health checks)."""

    async def aclose(self) -> None:
        """Stop what `open` started."""

    def start(self) -> None:
        """Start serving on threads of the backend's own."""

    def run(self) -> None:
        """Serve on the calling thread until `shutdown()` (an engine may do its work here)."""
        self.start()
        self._stopped.wait()

    def shutdown(self) -> None:
        """Stop; requests still running end."""
        self._stopped.set()
