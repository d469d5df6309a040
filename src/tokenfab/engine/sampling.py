"""Per-request sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, penalties, seeds).

`SamplingParams` refuses values the sampler cannot run safely (each error names the range), so a
request that reaches a step cannot poison it: a temperature below `MIN_TEMPERATURE` samples
greedily (its distribution is the argmax to float32 precision, and dividing by it overflows), seeds
fit torch's 64-bit generators, penalties are finite. Every tensor the sampler builds lives on the
logits' own device, and so do the per-request generators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenfab.engine import cpu_kernels

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


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A request's own random stream, on the device its logits live on (None: the global one)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    """Samples one token per row of a logits matrix; each row has its own params and generator."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        outputs: list[list[int]],
        blocked: list[tuple[int, ...]],
    ) -> list[int]:
        n = logits.shape[0]
        result: list[int | None] = [None] * n
        # Rows without penalties, blocked tokens or randomness: one argmax for the lot.
        simple = [i for i in range(n) if params[i].greedy and not _needs_adjust(params[i], blocked[i])]
        if len(simple) == n:
            return _argmax(logits).tolist()
        if simple:
            idx = torch.tensor(simple, device=logits.device)
            for i, tok in zip(simple, _argmax(logits.index_select(0, idx)).tolist()):
                result[i] = tok
        for i in range(n):
            if result[i] is None:
                result[i] = sample_row(logits[i], params[i], generators[i], outputs[i], blocked[i])
        return [int(t) for t in result]  # type: ignore[arg-type]


def sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None, output: list[int],
               blocked: tuple[int, ...]) -> int:
    """One row's token with everything its params ask for; the engine also calls it alone for one row."""
    row = logits.to(torch.float32, copy=True)
    dev = row.device
    if blocked:
        row[torch.tensor(blocked, device=dev)] = float("-inf")
    if (p.frequency_penalty or p.presence_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=dev), minlength=row.shape[0])[: row.shape[0]].float()
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    if p.greedy:
        return int(row.argmax())
    row = row / p.temperature
    if 0 < p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row[row < kth] = float("-inf")
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the token that crosses top_p
        sorted_logits[drop] = float("-inf")
        row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(row, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _needs_adjust(p: SamplingParams, blocked: tuple[int, ...]) -> bool:
    return bool(blocked) or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """First index of each row's maximum: the built CPU kernel (one pass, no temporaries) where it is in
    use; otherwise max(dim).indices, the same index as argmax and ~5x faster on bf16 here. (Rows with
    NaN, which only a broken model produces, get an arbitrary index from the kernel.)"""
    if logits.is_contiguous() and logits.shape[1] and cpu_kernels.supports(logits.dtype, logits.device):
        return cpu_kernels.ops().argmax_rows(logits)
    return logits.max(dim=-1).indices
