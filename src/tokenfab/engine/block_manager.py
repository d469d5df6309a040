"""Paged KV cache bookkeeping: fixed-size blocks with reference counts and a hash-addressed prefix cache.

A block's hash chains the hash of the block before it with the block's token ids, so equal hashes
mean equal prefixes. A block is registered in the cache only once its KV has been computed; a
freed block keeps its hash (and stays reusable) until it is taken for something else, oldest first.
"""

from __future__ import annotations

from collections import OrderedDict

from tokenfab.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


def chain_hash(prev: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.hits_tokens = 0
        self.queried_tokens = 0

    # --- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix; never the whole sequence (the last token is recomputed)."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        matched: list[int] = []
        prev: int | None = None
        for i in range((len(seq) - 1) // bs):
            toks = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(prev, toks)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != toks:
                break
            matched.append(bid)
            prev = h
        return matched

    # --- allocation ----------------------------------------------------------------------------
    def can_admit(self, seq: Sequence, reserve: int = 0) -> bool:
        matched = self._match_prefix(seq)
        reusable_free = sum(1 for b in matched if self.blocks[b].ref_count == 0)
        need = self.blocks_needed(len(seq)) - len(matched)
        return need + reusable_free + reserve <= self.num_free

    def admit(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        matched = self._match_prefix(seq)
        self.queried_tokens += len(seq)
        self.hits_tokens += len(matched) * self.block_size
        for bid in matched:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(block.hash)  # type: ignore[arg-type]
        seq.num_computed = len(matched) * self.block_size
        seq.num_hashed_blocks = len(matched)
        if seq.num_preemptions == 0:
            seq.num_cached_prompt = seq.num_computed
        for _ in range(self.blocks_needed(len(seq)) - len(matched)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None and self.cached.get(block.hash) == bid:
            del self.cached[block.hash]
        block.hash = None
        block.token_ids = None
        block.ref_count = 1
        return bid

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence can grow by one token (it may need a fresh block)."""
        return len(seq) + 1 <= len(seq.block_table) * self.block_size or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make room for one more token (call before the token is computed)."""
        if len(seq) + 1 > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take())

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks that reach zero stay cached until reused.

        Tail blocks go to the front of the eviction order so that shared prefixes live longest.
        """
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free[bid] = None
                    self.free.move_to_end(bid, last=False)
                else:
                    self.free[bid] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed = 0

    def register_computed(self, seq: Sequence) -> None:
        """Register hashes of blocks that became full and computed since the last call."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed, len(seq)) // bs
        for i in range(seq.num_hashed_blocks, full):
            toks = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            prev = seq.block_hashes[i - 1] if i > 0 else None
            h = chain_hash(prev, toks)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached:
                block.hash = h
                block.token_ids = toks
                self.cached[h] = block.block_id
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)
