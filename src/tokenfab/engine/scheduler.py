"""Continuous batching: which sequences run this step and how many of their tokens, under a token budget.

Each step: running sequences that are decoding take one token each, then unfinished prefills
continue in chunks, then waiting sequences are admitted while blocks, sequence slots and budget
last. When a running sequence needs a KV block and none is free, the lowest-priority, latest
sequence is preempted: its blocks are released (computed full blocks stay in the prefix cache)
and it goes back to the front of the queue to be recomputed.
"""

from __future__ import annotations

from collections import deque

from tokenfab.engine.block_manager import BlockManager
from tokenfab.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted) and release its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.bm.release(seq)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence) -> bool:
        """Make sure `seq` has a slot for every token; preempt others (or itself) if blocks run out."""
        bs = self.bm.block_size
        while len(seq.block_table) * bs < len(seq):
            if self.bm.num_free == 0:
                victim = max(self.running, key=lambda s: (s.priority, s.arrival_s))
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            seq.block_table.append(self.bm._take())
        return True

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        out: list[tuple[Sequence, int]] = []
        preemptions_before = self.num_preemptions
        self.running.sort(key=lambda s: (s.priority, s.arrival_s))
        # 1. decodes: one token each
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or len(seq) - seq.num_computed != 1:
                continue
            if self._grow(seq):
                out.append((seq, 1))
                budget -= 1
        # 2. unfinished prefills continue in chunks
        for seq in list(self.running):
            if budget == 0:
                break
            remaining = len(seq) - seq.num_computed
            if seq.status is Status.RUNNING and remaining > 1:
                n = min(remaining, budget)
                out.append((seq, n))
                budget -= n
        # 3. admissions, in priority order
        if len(self.waiting) > 1:
            self.waiting = deque(sorted(self.waiting, key=lambda s: (s.priority, s.arrival_s)))
        # (none after a preemption this step: memory is short, and a preempted sequence must not run twice)
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
            and self.num_preemptions == preemptions_before
        ):
            seq = self.waiting[0]
            if not self.bm.can_admit(seq, reserve=self.watermark_blocks if self.running else 0):
                break
            self.waiting.popleft()
            self.bm.admit(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed, budget)
            out.append((seq, n))
            budget -= n
        # a preempted sequence may have been scheduled before its preemption; drop it
        return [(s, n) for s, n in out if s.status is Status.RUNNING]
