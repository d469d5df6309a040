"""Which prompt prefixes each backend has recently seen, on hashes that are stable across processes.

A prompt is cut into blocks of `block_tokens` token ids; block i's hash covers blocks 0..i (each
hash chains the previous one), so two prompts share block i's hash exactly when they share their
first i+1 blocks. Hashes are BLAKE2b over the ids' bytes, the same in every process and machine
(Python's `hash()` of a tuple is salted per process). The index is approximate, as llm-d's
approximate prefix scorer is: it records what the router sent where, not what the engine kept,
and it forgets least recently used blocks beyond its capacity, which is best set to the backend's
own KV-cache size so that the index forgets about when the engine's cache does.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable
from hashlib import blake2b

MAX_BLOCKS = 256  # blocks looked at per prompt (llm-d: 256 of 16 tokens)


def _chained(blocks: Iterable[bytes]) -> list[bytes]:
    """Block i's hash covers blocks 0..i: each hashes the previous one with its own bytes."""
    out: list[bytes] = []
    prev = b""
    for block in blocks:
        prev = blake2b(prev + block, digest_size=16).digest()
        out.append(prev)
    return out


def block_hashes(token_ids: list[int], block_tokens: int = 16, max_blocks: int = MAX_BLOCKS) -> list[bytes]:
    """Chained hashes of the prompt's full blocks (a partial last block is not cacheable and is left out)."""
    n = min(len(token_ids) // block_tokens, max_blocks)
    return _chained(array("q", token_ids[i * block_tokens:(i + 1) * block_tokens]).tobytes() for i in range(n))


TEXT_BLOCK_BYTES = 64  # for prompts the gateway cannot tokenise: blocks of UTF-8 bytes instead


def text_block_hashes(text: str, block_bytes: int = TEXT_BLOCK_BYTES, max_blocks: int = MAX_BLOCKS) -> list[bytes]:
    """Chained hashes of a prompt's text in blocks of bytes, for a backend that tokenises itself: prompts that
    share a prefix of text share these hashes as they would share tokens."""
    raw = text.encode("utf-8", "surrogatepass")
    n = min(len(raw) // block_bytes, max_blocks)
    return _chained(raw[i * block_bytes:(i + 1) * block_bytes] for i in range(n))


class PrefixIndex:
    """One backend's recently routed blocks, an LRU bounded at `capacity_blocks` entries."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"a prefix index needs room for at least one block, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._lru: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hashes: list[bytes]) -> int:
        """How many leading blocks of a prompt this backend has seen (chained: the first miss ends the match)."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def insert(self, hashes: list[bytes]) -> None:
        lru = self._lru
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > self.capacity_blocks:
            lru.popitem(last=False)

    def clear(self) -> None:
        self._lru.clear()
