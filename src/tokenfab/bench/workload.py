"""Workloads: what to send. Synthetic lengths, shared prefixes, multi-turn chats, agentic traces, JSONL replay.

A workload is a list of `Job`s; a job is one conversation of one or more turns run in order (later
turns carry the real replies of earlier ones). Closed-loop concurrency is the number of jobs in flight.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class WorkloadError(ValueError):
    pass


@dataclass
class Turn:
    user: str  # the new user message (chat) or the prompt (completion)
    max_tokens: int


@dataclass
class Job:
    turns: list[Turn]
    system: str = ""
    tier: str = ""
    at_s: float | None = None  # trace timestamp (replay)
    kind: str = "chat"  # chat | completion


@dataclass(frozen=True)
class LengthDist:
    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        s = str(spec)
        parts = s.split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", float(parts[0]))
            if parts[0] == "uniform" and len(parts) == 3:
                return cls("uniform", float(parts[1]), float(parts[2]))
            if parts[0] == "normal" and len(parts) == 3:
                return cls("normal", float(parts[1]), float(parts[2]))
        except ValueError:
            pass
        raise WorkloadError(f"length {s!r}: use N, uniform:LO:HI or normal:MEAN:STD")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            v = self.a
        elif self.kind == "uniform":
            v = rng.uniform(self.a, self.b)
        else:
            v = rng.gauss(self.a, self.b)
        return max(1, round(v))


class TextMaker:
    """Makes text of about N tokens for a tokenizer from its own whole-word tokens."""

    def __init__(self, tokenizer: Tokenizer | None, rng: random.Random) -> None:
        self.tok = tokenizer
        self.rng = rng
        self.words: list[str] = []
        if tokenizer is not None:
            for i in range(256, 20000):
                w = tokenizer.decode([i])
                if len(w) > 2 and w[0] == " " and w[1:].isalpha() and w[1:].islower() and tokenizer.encode(w) == [i]:
                    self.words.append(w)
                if len(self.words) >= 3000:
                    break
        if not self.words:
            self.words = [" " + w for w in "the factory token speed power price tier model cache block batch "
                          "user queue energy watt joule step curve frontier".split()]

    def text(self, n_tokens: int) -> str:
        out = "".join(self.rng.choice(self.words) for _ in range(n_tokens)).lstrip()
        if self.tok is None:
            return out
        ids = self.tok.encode(out)
        while len(ids) < n_tokens:  # the first word lost its space; top up
            out += self.rng.choice(self.words)
            ids = self.tok.encode(out)
        return self.tok.decode(ids[:n_tokens])

    def count(self, text: str) -> int | None:
        return len(self.tok.encode(text)) if self.tok is not None else None


@dataclass
class WorkloadSpec:
    kind: str = "synthetic"  # synthetic | shared-prefix | multi-turn | agentic | replay
    num_jobs: int = 100
    input_len: str = "128"
    output_len: str = "64"
    prefix_len: int = 512  # shared-prefix: tokens shared by every prompt
    num_prefixes: int = 1
    turns: int = 4  # multi-turn / agentic: turns per conversation
    trace: str = ""  # replay: JSONL path
    api: str = "chat"  # chat | completion
    tiers: list[str] = field(default_factory=list)  # round-robin tier labels (one API key each)
    seed: int = 0


def build(spec: WorkloadSpec, tokenizer: Tokenizer | None) -> list[Job]:
    rng = random.Random(spec.seed)
    maker = TextMaker(tokenizer, rng)
    inp, outp = LengthDist.parse(spec.input_len), LengthDist.parse(spec.output_len)
    jobs: list[Job]
    if spec.kind == "synthetic":
        jobs = [Job([Turn(maker.text(inp.sample(rng)), outp.sample(rng))]) for _ in range(spec.num_jobs)]
    elif spec.kind == "shared-prefix":
        prefixes = [maker.text(spec.prefix_len) for _ in range(max(1, spec.num_prefixes))]
        jobs = [Job([Turn(maker.text(inp.sample(rng)), outp.sample(rng))], system=prefixes[i % len(prefixes)])
                for i in range(spec.num_jobs)]
    elif spec.kind == "multi-turn":
        jobs = [Job([Turn(maker.text(inp.sample(rng)), outp.sample(rng)) for _ in range(spec.turns)])
                for _ in range(spec.num_jobs)]
    elif spec.kind == "agentic":
        # a long context (instructions + tool descriptions), then many short tool-result turns
        jobs = []
        for _ in range(spec.num_jobs):
            turns = [Turn("Task: " + maker.text(inp.sample(rng)), outp.sample(rng))]
            turns += [Turn("Tool result: " + maker.text(rng.randint(8, 48)), rng.randint(8, 32))
                      for _ in range(spec.turns - 1)]
            jobs.append(Job(turns, system=maker.text(max(spec.prefix_len, 1024))))
    elif spec.kind == "replay":
        jobs = load_trace(spec.trace, maker, rng)
    else:
        raise WorkloadError(f"unknown workload {spec.kind!r}: synthetic, shared-prefix, multi-turn, agentic, replay")
    for i, j in enumerate(jobs):
        if spec.kind != "replay" or not j.kind:
            j.kind = spec.api
        if spec.tiers and not j.tier:
            j.tier = spec.tiers[i % len(spec.tiers)]
    return jobs


def load_trace(path: str, maker: TextMaker, rng: random.Random) -> list[Job]:
    """JSONL, one request a line: {"timestamp": s, "input_len": n, "output_len": m} or
    {"timestamp": s, "messages": [...], "max_tokens": m}; optional "tier"."""
    p = Path(path)
    if not path or not p.is_file():
        raise WorkloadError(f"trace file {path!r} not found")
    jobs = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row: dict[str, Any] = json.loads(line)
            ts = float(row.get("timestamp", 0.0))
            if "messages" in row:
                msgs = row["messages"]
                system = "".join(m["content"] for m in msgs if m["role"] == "system")
                user = msgs[-1]["content"]
                turn = Turn(user, int(row.get("max_tokens", row.get("output_len", 64))))
            else:
                turn = Turn(maker.text(int(row["input_len"])), int(row["output_len"]))
                system = ""
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise WorkloadError(f"{path}:{lineno}: {exc.__class__.__name__}: {exc}") from None
        jobs.append(Job([turn], system=system, tier=str(row.get("tier", "")), at_s=ts, kind="chat"))
    if not jobs:
        raise WorkloadError(f"trace file {path} holds no requests")
    t0 = min(j.at_s or 0.0 for j in jobs)
    for j in jobs:
        j.at_s = (j.at_s or 0.0) - t0
    return sorted(jobs, key=lambda j: j.at_s or 0.0)
