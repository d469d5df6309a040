"""A request inside the engine: its tokens, its KV blocks, how far it has been computed, and its output text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from tokenfab.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: str
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    arrival_s: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first (tiers map onto this)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at first admission
    num_hashed_blocks: int = 0  # leading full blocks whose hash is registered
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_token_s: float | None = None
    first_scheduled_s: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token was produced
    joules: float = 0.0  # energy attributed to this sequence (its share of each step it took part in)
    device_s: float = 0.0  # engine time attributed likewise
    generator: torch.Generator | None = None  # set by the engine, on the logits' device, when seeded
    # detokenisation state
    text: str = ""
    emitted_chars: int = 0
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self) -> None:
        self.prefix_offset = self.read_offset = self.prompt_len

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
