"""Continuous batching: which sequences run this step and how many of their tokens, under a token budget.

Each step: running sequences that are decoding take one token each, then unfinished prefills
continue in chunks, then waiting sequences are admitted while blocks, sequence slots and budget
last. When a running sequence needs a KV block and none is free, the lowest-priority, latest
sequence is preempted: its blocks are released (computed full blocks stay in the prefix cache)
and it goes back to the front of the queue to be recomputed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from tokenfab.engine.block_manager import BlockManager
from tokenfab.engine.sequence import Sequence, Status
from tokenfab.step_model import SPEED_HEADROOM, StepTimeModel


@dataclass(frozen=True)
class TierClass:
    """What the scheduler needs of a tier; a sequence's `priority` is its index in the policy (0 = first)."""

    name: str
    guaranteed_share: float = 0.0
    max_share: float = 1.0
    min_tok_s_user: float = 0.0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: tuple[TierClass, ...] | None = None, step_model: StepTimeModel | None = None) -> None:
        self.bm = block_manager
        self.policy = policy
        self.step_model = step_model or StepTimeModel()
        self.budget_scale = 1.0  # feedback on the step model: shrinks when steps overrun their target
        self.target_step_s = float("inf")
        self.budget_bound = False  # whether the last step used (nearly) all of its time budget
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
        if self.policy:
            return self._schedule_tiers(self.policy)
        return self._schedule_fcfs()

    # --- tier-aware ----------------------------------------------------------------------------
    def _rank(self, seq: Sequence, n: int) -> int:
        return min(max(seq.priority, 0), n - 1)

    def time_budget_s(self) -> float:
        """Seconds of work a step may hold so the fastest tier that is decoding keeps its tok/s per user.

        Only decoding streams bound the step: a step of prefill alone slows nobody down, and cutting a
        lone long prompt into step-sized chunks would only add per-step cost to its TTFT.
        """
        self.target_step_s = float("inf")
        decoding = [s for s in self.running if s.num_computed >= s.prompt_len]
        if self.policy and decoding:
            n = len(self.policy)
            fastest = min(self._rank(s, n) for s in decoding)
            # aim 15% faster than the SLO: tokens also wait outside the step (sampling, streaming)
            speed = self.policy[fastest].min_tok_s_user / SPEED_HEADROOM
            if speed > 0:
                self.target_step_s = 1.0 / speed
            return self.budget_scale * self.step_model.time_for(speed)
        return float("inf")

    def observe_step(self, step_s: float) -> None:
        """Close the loop: if steps sized for a tier's speed take longer than 1/speed, size them smaller;
        if steps that used their whole budget take less, larger. (A light step is short whatever the
        budget, so it says nothing about it: counting those let the scale drift to its cap.)"""
        if self.target_step_s != float("inf") and step_s > 0 and (self.budget_bound or step_s > self.target_step_s):
            ratio = self.target_step_s / step_s
            self.budget_scale = min(4.0, max(0.02, self.budget_scale * ratio**0.5))

    def _schedule_tiers(self, policy: tuple[TierClass, ...]) -> list[tuple[Sequence, int]]:
        """Guaranteed shares first, then priority order up to each tier's max share, then any leftover.

        Shares are of the step's time budget (decodes and prefill tokens cost what the live step
        model says), within the token budget. Within a tier: decodes (1 token), unfinished prefills
        (chunks), then admissions. A waiting sequence that cannot get blocks or a slot may preempt a
        running sequence of a lower tier.

        Pacing: steps are sized for the fastest tier with work, so a slower tier's stream would get a
        token every step, faster than it paid for. In the first two passes a decode runs only when it
        is due (its next token would otherwise fall behind the tier's speed with headroom); decodes
        that are ahead of their pace wait for the last, work-conserving pass, so when the budget is
        short it goes to admitting and serving faster tiers instead.
        """
        n_tiers = len(policy)
        m = self.step_model
        budget_s = self.time_budget_s()
        if budget_s == float("inf"):  # no speed SLO: every decode plus a full prefill budget
            budget_s = m.b_dec_s * len(self.running) + m.b_pre_s * self.max_num_batched_tokens
        left_s = budget_s
        left_tok = self.max_num_batched_tokens
        used = [0.0] * n_tiers
        out: dict[str, tuple[Sequence, int]] = {}
        preempted: set[str] = set()
        key = lambda s: (s.priority, s.arrival_s)  # noqa: E731
        by_rank: list[list[Sequence]] = [[] for _ in range(n_tiers)]
        for s in sorted(self.running, key=key):
            by_rank[self._rank(s, n_tiers)].append(s)
        waiting: list[list[Sequence]] = [[] for _ in range(n_tiers)]
        for s in sorted(self.waiting, key=key):
            waiting[self._rank(s, n_tiers)].append(s)
        now = time.monotonic()
        pace = [t.min_tok_s_user / SPEED_HEADROOM for t in policy]

        def ahead(rank: int, seq: Sequence) -> bool:
            """Whether a decoding `seq` can skip this step and still make its tier's pace."""
            if seq.first_token_s is None or pace[rank] <= 0 or self.target_step_s == float("inf"):
                return False
            if pace[rank] * self.target_step_s >= 1.0:  # the tier wants a token every step
                return False
            next_due = seq.first_token_s + seq.num_output / pace[rank]
            return next_due > now + 2 * self.target_step_s

        def take(rank: int, seq: Sequence, want: int, cap_s: float) -> int:
            """Schedule up to `want` tokens of `seq` within the tier's cap; returns how many (0 = none)."""
            nonlocal left_s, left_tok
            if want == 1:
                cost = m.b_dec_s
                if cost > min(left_s, cap_s - used[rank]) + 1e-12 and out:
                    return 0
                n = 1
            else:
                room = min(left_s, cap_s - used[rank])
                n = min(want, left_tok, int(room / m.b_pre_s))
                if n <= 0:
                    if out:
                        return 0
                    n = min(want, left_tok, 1)  # an empty step always makes progress
                cost = n * m.b_pre_s
            if n > left_tok:
                return 0
            have = out[seq.seq_id][1] if seq.seq_id in out else 0
            out[seq.seq_id] = (seq, have + n)
            used[rank] += cost
            left_s -= cost
            left_tok -= n
            return n

        def fill(rank: int, cap_s: float, paced: bool = True) -> None:
            for seq in by_rank[rank]:  # decodes, then unfinished prefills
                if left_s <= 0 or left_tok <= 0 or used[rank] >= cap_s:
                    return
                if seq.status is not Status.RUNNING:
                    continue
                # a prefill chunk scheduled in an earlier pass may grow into this pass's budget
                have = out[seq.seq_id][1] if seq.seq_id in out else 0
                remaining = len(seq) - seq.num_computed - have
                if remaining <= 0:
                    continue
                if not have and paced and remaining == 1 and ahead(rank, seq):
                    continue
                if not have and remaining == 1 and not self._grow(seq):
                    preempted.add(seq.seq_id)
                    continue
                if not take(rank, seq, remaining, cap_s):
                    return
            while waiting[rank] and left_s > 0 and left_tok > 0 and used[rank] < cap_s:
                seq = admit_next(rank)
                if seq is None:
                    return
                if not take(rank, seq, len(seq) - seq.num_computed, cap_s):
                    return

        def admit_next(rank: int) -> Sequence | None:
            """Move the tier's first waiting sequence to running (preempting lower tiers for room)."""
            while waiting[rank]:
                seq = waiting[rank][0]
                if seq.seq_id in preempted:
                    waiting[rank].pop(0)
                    continue
                if not self._make_room(seq, rank, n_tiers, preempted):
                    return None
                waiting[rank].pop(0)
                self.waiting.remove(seq)
                self.bm.admit(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
                by_rank[rank].append(seq)
                return seq
            return None

        for rank in range(n_tiers):  # 1. guaranteed shares
            if policy[rank].guaranteed_share:
                fill(rank, policy[rank].guaranteed_share * budget_s)
        for rank in range(n_tiers):  # 2. priority order, up to each max share
            fill(rank, policy[rank].max_share * budget_s)
        for rank in range(n_tiers):  # 3. work-conserving: leftover budget to anyone, paced or not
            fill(rank, budget_s, paced=False)
        self.budget_bound = left_s < 0.1 * budget_s
        return [(s, n) for s, n in out.values() if s.status is Status.RUNNING]

    def _make_room(self, seq: Sequence, rank: int, n_tiers: int, preempted: set[str]) -> bool:
        """Whether `seq` can be admitted now, preempting lower-tier running sequences if needed."""
        while True:
            slots_ok = len(self.running) < self.max_num_seqs
            if slots_ok and self.bm.can_admit(seq, reserve=self.watermark_blocks if self.running else 0):
                return True
            lower = [s for s in self.running if self._rank(s, n_tiers) > rank]
            if not lower:
                return False
            victim = max(lower, key=lambda s: (s.priority, s.arrival_s))
            self._preempt(victim)
            preempted.add(victim.seq_id)

    # --- first come, first served ------------------------------------------------------------------
    def _schedule_fcfs(self) -> list[tuple[Sequence, int]]:
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
