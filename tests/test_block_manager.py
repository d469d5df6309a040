"""Block manager bookkeeping: reference counts, prefix hashing, eviction order."""

from __future__ import annotations

from tokenfab.engine.block_manager import BlockManager
from tokenfab.engine.sampling import SamplingParams
from tokenfab.engine.sequence import Sequence


def seq(ids, name="s"):
    return Sequence(name, list(ids), len(ids), SamplingParams())


def computed(bm, s):
    s.num_computed = len(s)
    bm.register_computed(s)


def test_admit_allocates_and_release_returns_blocks():
    bm = BlockManager(8, 4)
    s = seq(range(10))
    bm.admit(s)
    assert len(s.block_table) == 3 and bm.num_free == 5
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
    bm.release(s)
    assert bm.num_free == 8 and s.block_table == []


def test_shared_prefix_is_reused_with_refcounts():
    bm = BlockManager(16, 4)
    a = seq(list(range(12)) + [100, 101], "a")
    bm.admit(a)
    computed(bm, a)
    b = seq(list(range(12)) + [200], "b")
    bm.admit(b)
    assert b.block_table[:3] == a.block_table[:3]
    assert b.num_computed == 12 and b.num_cached_prompt == 12
    assert [bm.blocks[x].ref_count for x in a.block_table[:3]] == [2, 2, 2]
    bm.release(a)
    assert [bm.blocks[x].ref_count for x in b.block_table[:3]] == [1, 1, 1]


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(16, 4)
    a = seq(range(8), "a")
    bm.admit(a)
    computed(bm, a)
    b = seq(range(8), "b")  # identical prompt: the final block must be recomputed for logits
    bm.admit(b)
    assert b.num_computed == 4


def test_freed_cached_blocks_survive_until_evicted_oldest_first():
    bm = BlockManager(4, 4)
    a = seq(range(8), "a")
    bm.admit(a)
    computed(bm, a)
    bm.release(a)
    assert bm.num_free == 4 and len(bm.cached) == 2
    again = seq(list(range(8)) + [9], "again")
    assert bm.can_admit(again)
    bm.admit(again)
    assert again.num_computed == 8  # both blocks revived from the free list
    bm.release(again)
    # fill the cache with something else: cached blocks get evicted and unregistered
    other = seq(range(50, 66), "other")
    bm.admit(other)
    assert bm.num_free == 0 and len(bm.cached) == 0


def test_uncomputed_blocks_are_not_cache_hits():
    bm = BlockManager(16, 4)
    a = seq(range(12), "a")
    bm.admit(a)  # not computed yet
    b = seq(range(13), "b")
    bm.admit(b)
    assert b.num_computed == 0


def test_can_admit_counts_watermark():
    bm = BlockManager(4, 4)
    s = seq(range(12))
    assert bm.can_admit(s)
    assert not bm.can_admit(s, reserve=2)
