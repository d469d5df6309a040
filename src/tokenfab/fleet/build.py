"""A fleet from the settings: its pools' backends (URLs, and local workers it starts), router and tokenizer."""

from __future__ import annotations

import logging
from typing import Any

from tokenfab.backends.openai import OpenAIBackend, PowerModel
from tokenfab.config import PoolConfig, Settings
from tokenfab.fleet.fleet import FleetBackend
from tokenfab.fleet.prefix_index import PrefixIndex
from tokenfab.fleet.router import Member, Router, Weights
from tokenfab.fleet.workers import LocalWorkers
from tokenfab.tokenizer import load_tokenizer

log = logging.getLogger("tokenfab.fleet")


def gateway_tokenizer(settings: Settings) -> Any:
    """The model's tokenizer for the gateway: the fleet's `tokenizer` setting, the engine's model when
    it names a file or folder, or the bundled model's; None for `none` (the backends template and
    tokenise, and prompts pass through as text)."""
    spec = settings.fleet.tokenizer
    if spec == "none":
        return None
    model = settings.engine.model
    if not spec and ("/" in model or model.endswith(".gguf")):
        spec = model
    tok = load_tokenizer(spec or None)
    if tok is None:
        raise ValueError("no tokenizer for the model: give --tokenizer (a .gguf, a tokenizer.json or a Hugging Face "
                         "folder), or --tokenizer none to let the backends template and tokenise")
    return tok


def member_backend(pool: PoolConfig, url: str, settings: Settings, tokenizer: Any) -> OpenAIBackend:
    f = settings.fleet
    power = PowerModel(pool.idle_watts, pool.busy_watts) if pool.busy_watts > 0 else None
    host = url.split("://", 1)[-1].split("/", 1)[0]
    return OpenAIBackend(url, name=f"{pool.name}/{host}", model=pool.model, kind=pool.kind, tokenizer=tokenizer,
                         power=power, energy_url=pool.energy_url, idle_watts=pool.idle_watts, trust=pool.trust,
                         metrics_interval_s=f.metrics_interval_s,
                         health_interval_s=f.health_interval_s)


def build_fleet(settings: Settings) -> FleetBackend:
    f = settings.fleet
    tokenizer = gateway_tokenizer(settings)
    members: list[Member] = []
    started: list[LocalWorkers] = []
    try:
        for pool in settings.fleet_pools():
            urls = list(pool.backends)
            if pool.workers:
                workers = LocalWorkers(pool.workers, settings.engine, f.worker_threads)
                started.append(workers)
                urls += workers.start()
            for url in urls:
                b = member_backend(pool, url, settings, tokenizer)
                if not b.discover_sync():
                    log.warning("fleet: %s is not reachable yet (%s); it joins once its health check passes",
                                b.name, b.last_error)
                blocks = f.prefix_index_blocks
                if b.kv_cache_tokens:
                    blocks = max(1, min(blocks, b.kv_cache_tokens // f.prefix_block_tokens))
                members.append(Member(b, pool.name, PrefixIndex(blocks), frozenset(pool.tiers)))
        model = settings.server.served_model_name or next(
            (m.backend.model for m in members if m.backend.discovered), "") or members[0].backend.model or "model"
        fleet = FleetBackend(members, Router(f.route_policy, Weights.parse(f.route_weights)), tokenizer, model, settings.engine.max_model_len,
                             f.prefix_block_tokens, f.health_interval_s)
    except BaseException:
        for w in started:
            w.stop()
        raise
    fleet.owned_workers = started
    return fleet
