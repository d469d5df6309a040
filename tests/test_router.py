"""The router's pure parts: stable block hashes, the bounded prefix index, each policy's ranking, pools in the config."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenfab.backends.base import Backend, Capabilities, LoadSnapshot, ModelInfo
from tokenfab.config import ConfigError, load_settings
from tokenfab.fleet.prefix_index import PrefixIndex, block_hashes
from tokenfab.fleet.router import Member, Router, Weights


class LoadedBackend(Backend):
    """A backend whose load the test sets (the router reads only `load()`, `name` and `max_num_seqs`)."""

    def __init__(self, name: str, in_flight: int = 0, waiting: int = 0, kv: float = 0.0, max_num_seqs: int = 8,
                 age: float | None = 0.01) -> None:
        super().__init__()
        self.name, self.max_num_seqs = name, max_num_seqs
        self.info, self.capabilities = ModelInfo(name="m", max_model_len=100), Capabilities()
        self.snapshot = LoadSnapshot(running=in_flight, waiting=waiting, in_flight=in_flight, kv_cache_usage=kv,
                                     metrics_age_s=age)

    def load(self) -> LoadSnapshot:
        return self.snapshot

    def generate(self, *a, **k):  # noqa: ANN002, ANN003 - never called here
        raise AssertionError("not routed to in these tests")

    def check_request(self, num_prompt_tokens, params) -> None:  # noqa: ANN001
        pass


def members(*backends: LoadedBackend) -> list[Member]:
    return [Member(b, "p", PrefixIndex(1000)) for b in backends]


PROMPT = list(range(100, 260))  # 10 blocks of 16


def test_block_hashes_are_chained_and_the_same_in_every_process():
    h = block_hashes(PROMPT)
    assert len(h) == 10 and len(set(h)) == 10
    assert block_hashes(PROMPT[:40]) == h[:2]  # a partial last block is left out
    assert block_hashes([7] + PROMPT[1:])[0] != h[0] and block_hashes([7] + PROMPT[1:])[5] != h[5]  # chained
    code = "from tokenfab.fleet.prefix_index import block_hashes; print(block_hashes(list(range(100, 260)))[-1].hex())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == h[-1].hex()  # hash randomisation does not touch them


def test_the_prefix_index_matches_leading_blocks_and_forgets_least_recently_used_beyond_its_capacity():
    idx = PrefixIndex(12)
    a, b = block_hashes(PROMPT), block_hashes(list(range(500, 660)))
    idx.insert(a)
    assert idx.match(a) == 10 and idx.match(a[:4] + b[4:]) == 4 and idx.match(b) == 0
    idx.insert(b)  # 20 blocks into room for 12: a's oldest eight go first
    assert len(idx) == 12 and idx.match(b) == 10 and idx.match(a) == 0
    with pytest.raises(ValueError):
        PrefixIndex(0)


def test_each_policy_ranks_as_documented():
    hot, cold = LoadedBackend("hot", in_flight=3), LoadedBackend("cold", in_flight=0)
    ms = members(hot, cold)
    hashes = block_hashes(PROMPT)
    ms[0].index.insert(hashes)
    assert Router("prefix").rank(ms, hashes)[0].member.name == "hot"
    assert Router("least-loaded").rank(ms, hashes)[0].member.name == "cold"
    rr = Router("round-robin")
    assert [rr.rank(ms, hashes)[0].member.name for _ in range(4)] == ["hot", "cold", "hot", "cold"]
    # prefix+load: the whole prefix (3 points) outweighs the queue (2 points) ...
    first = Router("prefix+load").rank(ms, hashes)
    assert first[0].member.name == "hot" and first[0].prefix_blocks == 10
    assert first[0].score == pytest.approx(2 * 0 + 2 * 1 + 3 * 1.0) and first[1].score == pytest.approx(2 + 2)
    # ... until the hot one saturates: 5 waiting beyond its batch, a KV cache 80% full, or stale metrics
    for sat in (LoadedBackend("hot", in_flight=13, max_num_seqs=8), LoadedBackend("hot", waiting=5),
                LoadedBackend("hot", kv=0.8), LoadedBackend("hot", age=5.0)):
        ms2 = members(sat, LoadedBackend("cold"))
        ms2[0].index.insert(hashes)
        ranked = Router("prefix+load").rank(ms2, hashes)
        assert [c.member.name for c in ranked] == ["cold", "hot"] and ranked[1].saturated
    # when every backend is saturated the best score still wins
    ms3 = members(LoadedBackend("a", waiting=9), LoadedBackend("b", waiting=9))
    ms3[1].index.insert(hashes)
    assert Router("prefix+load").rank(ms3, hashes)[0].member.name == "b"
    with pytest.raises(ValueError, match="round-robin"):
        Router("random")


def test_pools_in_the_config_file(tmp_path):
    good = tmp_path / "t.yaml"
    good.write_text("pools:\n  - {name: gpu, backends: [http://10.0.0.5:8000/v1], kind: vllm, tiers: [premium],"
                    " trust: local, busy_watts: 700}\n  - {name: cpu, workers: 2}\n")
    s = load_settings(str(good), env={})
    gpu, cpu = s.fleet_pools()
    assert gpu.tiers == ("premium",) and gpu.busy_watts == 700 and gpu.trust == "local" and cpu.workers == 2
    flags = load_settings(None, {"backends": "http://a:1/v1, http://b:2/v1", "route_policy": "prefix"}, env={})
    assert flags.fleet_pools()[0].backends == ("http://a:1/v1", "http://b:2/v1")
    assert load_settings(None, {}, env={}).fleet_pools() == ()  # the embedded engine
    for body, msg in (("pools:\n  - {name: x}\n", "no backends and no workers"),
                      ("pools:\n  - {name: x, workers: 1, tiers: [gold]}\n", "tier 'gold'"),
                      ("pools:\n  - {name: x, workers: 1, colour: red}\n", "unknown key 'colour'"),
                      ("pools:\n  - {name: x, workers: 1}\n  - {name: x, workers: 1}\n", "unique")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(body)
        with pytest.raises(ConfigError, match=msg):
            load_settings(str(bad), env={})
    with pytest.raises(ConfigError, match="route_policy"):
        load_settings(None, {"route_policy": "fastest"}, env={})
    with pytest.raises(ConfigError, match="route_weights"):
        load_settings(None, {"route_weights": "2,2"}, env={})


def test_route_weights_trade_affinity_against_load():
    hashes = block_hashes(PROMPT)
    ms = members(LoadedBackend("holder", in_flight=2), LoadedBackend("idle"))
    ms[0].index.insert(hashes)
    assert Router("prefix+load").rank(ms, hashes)[0].member.name == "holder"  # 3 (prefix) + 2 > 2 + 2
    heavy_queue = Router("prefix+load", Weights.parse("4,2,3"))
    assert heavy_queue.rank(ms, hashes)[0].member.name == "idle"  # 4 + 2 > 3 + 2


def test_a_pool_takes_only_its_tiers_and_an_unhealthy_member_takes_nothing():
    from tokenfab.fleet.fleet import FleetBackend

    gpu, cpu, down = LoadedBackend("gpu/a"), LoadedBackend("cpu/a"), LoadedBackend("cpu/b")
    down.mark_failed("GET /health answered 503")
    fleet = FleetBackend([Member(gpu, "gpu", PrefixIndex(10), frozenset({"premium"})),
                          Member(cpu, "cpu", PrefixIndex(10)), Member(down, "cpu", PrefixIndex(10))],
                         Router(), tokenizer=object(), model="m", max_model_len=100)
    assert [m.name for m in fleet.candidates("premium")] == ["gpu/a", "cpu/a"]
    assert [m.name for m in fleet.candidates("free")] == ["cpu/a"]
    assert fleet.health()["fleet"]["members"][2]["healthy"] is False
    with pytest.raises(ValueError, match="unique"):
        FleetBackend([Member(gpu, "x", PrefixIndex(1)), Member(gpu, "y", PrefixIndex(1))], Router(), object(), "m", 1)
