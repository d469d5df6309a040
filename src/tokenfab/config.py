"""tokenfab.yaml: one file of settings, each key overridable by an env var (TOKENFAB_KEY) and a CLI flag (--key).

Precedence, lowest first: defaults < tokenfab.yaml < environment < command line. Keys are
unique across sections, so `port` is `server.port` in YAML, TOKENFAB_PORT in the environment
and --port on the command line.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokenfab.economics.tiers import TierError, TierTable, default_tiers, tiers_from_list
from tokenfab.engine.config import EngineConfig


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = ""  # "" = the loaded model's own name
    max_body_bytes: int = 0  # 0: sized for the model (a whole-context prompt, twice over; at least 1 MiB)
    max_waiting: int = 512  # requests queued beyond this are answered 429 with Retry-After
    log_level: str = "info"


@dataclass(frozen=True)
class LedgerConfig:
    ledger_url: str = ""  # "" = SQLite in the per-user data directory; or sqlite:///PATH, postgresql+psycopg://...
    anonymous_tier: str = "free"  # tier for requests without a key; "" = every request needs a key
    checkpoint_interval_s: float = 1.0  # how often each stream's delivered tokens are written (a crash loses less)
    reservation_lease_s: float = 30.0  # a server's reservations outlive it by this long before others recover them

    def resolved_url(self) -> str:
        """The ledger's URL with any SQLite path made absolute (relative paths are taken from the
        working directory once, here, so every command names the same file)."""
        url = self.ledger_url or f"sqlite:///{default_data_dir() / 'ledger.db'}"
        prefix = "sqlite:///"
        if url.startswith(prefix) and url != prefix + ":memory:":
            path = Path(url[len(prefix):]).expanduser()
            if not path.is_absolute():
                path = Path.cwd() / path
            return prefix + str(path)
        return url


def legacy_ledger_hint(lc: LedgerConfig) -> str | None:
    """A note for someone upgrading: the default ledger used to be ./tokenfab.db in the working directory."""
    old = Path("tokenfab.db")
    if lc.ledger_url or not old.is_file():
        return None
    return (f"found {old.resolve()}, the ledger's old default location; this server uses {lc.resolved_url()}. "
            f"To keep using the old one, set ledger_url: sqlite:///{old.resolve()}")


def default_data_dir() -> Path:
    """Where tokenfab keeps its own files by default: the platform's per-user data directory
    (on Linux $XDG_DATA_HOME/tokenfab, i.e. ~/.local/share/tokenfab)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("tokenfab", appauthor=False))


@dataclass(frozen=True)
class MeterConfig:
    energy_source: str = "auto"  # auto (NVML, else RAPL, else model) | nvml | rapl | model
    cpu_watts_per_core: float = 10.0  # the CPU-time model: watts per fully busy core
    idle_watts: float = 0.0  # the CPU-time model: watts while idle (not attributed to requests)
    electricity_usd_per_kwh: float = 0.08
    pue: float = 1.3
    capex_usd_per_hour: float = 0.05  # amortised cost of the machine per hour of engine time


@dataclass(frozen=True)
class AdmissionConfig:
    tier_queue_limit: int = 64  # waiting requests per tier beyond which that tier gets 429
    admission_slack: float = 1.0  # reject when predicted TTFT > slack x the tier's TTFT SLO
    tier_scheduling: bool = True  # false: plain FCFS (the baseline)


@dataclass(frozen=True)
class FleetConfig:
    """A single pool from flags alone (`pools:` in the YAML holds several); no backends and no workers: embedded."""

    backends: str = ""  # comma-separated OpenAI base URLs (http://host:port/v1) of servers to route to
    workers: int = 0  # local `tokenfab worker` processes the gateway starts and routes to (0: none)
    worker_threads: int = 1  # engine threads per local worker (one each: several engines share the cores)
    backend_kind: str = "auto"  # auto (the server's model card says) | tokenfab | vllm | sglang | llamacpp | openai
    upstream_model: str = ""  # the model's name at the backends ("" = the first each lists)
    tokenizer: str = ""  # the model's tokenizer for the gateway (.gguf, tokenizer.json, HF folder; "" = the engine
    # model's or the bundled one; "none": the backends template and tokenise, prompts pass through as text)
    route_policy: str = "prefix+load"  # round-robin | least-loaded | prefix | prefix+load
    route_weights: str = "2,2,3"  # prefix+load's weights: queue, KV cache free, prefix (llm-d's defaults)
    prefix_block_tokens: int = 16  # tokens per hashed block of the router's prefix index
    prefix_index_blocks: int = 65536  # per backend, at most (and at most its KV cache, when it says)
    metrics_interval_s: float = 0.1  # how often each backend's /metrics is read (0: never; observed load only)
    health_interval_s: float = 1.0  # how often each backend's /health is checked
    backend_idle_watts: float = 0.0  # the power model of each backend's device: idle draw (not attributed)
    backend_busy_watts: float = 0.0  # ... and draw while serving, split across its requests (0: no energy model)
    backend_energy_url: str = ""  # the backends' devices' meter (a DCGM exporter's /metrics): measured joules


@dataclass(frozen=True)
class PoolConfig:
    """One named pool of the `pools:` list: backends that serve one model, the tiers they take, their power."""

    name: str
    backends: tuple[str, ...] = ()
    workers: int = 0
    kind: str = "auto"
    model: str = ""
    tiers: tuple[str, ...] = ()  # () takes every tier
    trust: str = "external"  # local: inside the factory's walls; external: someone else's server
    idle_watts: float = 0.0
    busy_watts: float = 0.0
    energy_url: str = ""  # the devices' meter: a DCGM exporter's /metrics (measured; else the power model)


POOL_KEYS = {f.name for f in dataclasses.fields(PoolConfig)}


def pools_from_list(data: Any, where: str, tiers: TierTable) -> tuple[PoolConfig, ...]:
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where}: expected a non-empty list of pools (name, backends or workers, ...)")
    pools = []
    for i, item in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{at}: each pool is a mapping with a name")
        unknown = set(item) - POOL_KEYS
        if unknown:
            raise ConfigError(f"{at}: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(POOL_KEYS))})")
        backends = item.get("backends") or []
        if isinstance(backends, str):
            backends = [b for b in backends.split(",") if b.strip()]
        pool_tiers = tuple(item.get("tiers") or ())
        for t in pool_tiers:
            if t not in tiers.names:
                raise ConfigError(f"{at}: tier {t!r} is not a tier ({', '.join(tiers.names)})")
        try:
            pool = PoolConfig(
                name=str(item["name"]), backends=tuple(str(b).strip() for b in backends),
                workers=int(item.get("workers", 0)), kind=str(item.get("kind", "auto")), model=str(item.get("model", "")),
                tiers=pool_tiers, trust=str(item.get("trust", "external")),
                idle_watts=float(item.get("idle_watts", 0.0)), busy_watts=float(item.get("busy_watts", 0.0)),
                energy_url=str(item.get("energy_url", "")))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{at}: {exc}") from None
        if not pool.backends and pool.workers < 1:
            raise ConfigError(f"{at}: pool {pool.name!r} has no backends and no workers")
        if pool.trust not in ("local", "external"):
            raise ConfigError(f"{at}: trust must be local or external, got {pool.trust!r}")
        pools.append(pool)
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: pool names must be unique")
    return tuple(pools)


@dataclass(frozen=True)
class Settings:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    meter: MeterConfig = field(default_factory=MeterConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    tiers: TierTable = field(default_factory=default_tiers)
    pools: tuple[PoolConfig, ...] = ()

    def fleet_pools(self) -> tuple[PoolConfig, ...]:
        """The pools to route to: the `pools:` list, or one pool from the fleet flags; () = the embedded engine."""
        if self.pools:
            return self.pools
        f = self.fleet
        urls = tuple(u.strip() for u in f.backends.split(",") if u.strip())
        if not urls and f.workers < 1:
            return ()
        trust = "local" if f.workers and not urls else "external"
        return (PoolConfig("default", urls, f.workers, f.backend_kind, f.upstream_model, (), trust,
                           f.backend_idle_watts, f.backend_busy_watts, f.backend_energy_url),)


SECTIONS = {"server": ServerConfig, "engine": EngineConfig, "ledger": LedgerConfig, "meter": MeterConfig,
            "admission": AdmissionConfig, "fleet": FleetConfig}


RENAMED = {"int8_max_tokens": "small_batch_max_tokens"}  # old key -> new key, for a clear error


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        f.type = hints[f.name]
        out[f.name] = f
    return out


def all_keys() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every settable key -> (section, field)."""
    keys: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for name, f in _fields(cls).items():
            keys[name] = (section, f)
    return keys


def _convert(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ in (int, float, str):
            if typ is not str and isinstance(value, bool):
                raise ValueError(value)
            return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    return value


def load_settings(path: str | None = None, cli: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    keys = all_keys()
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    tiers = default_tiers()
    pools_data = None
    file = path or env.get("TOKENFAB_CONFIG")
    if file is None and Path("tokenfab.yaml").is_file():
        file = "tokenfab.yaml"
    if file:
        p = Path(file)
        if not p.is_file():
            raise ConfigError(f"config file {file} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of sections ({', '.join(SECTIONS)})")
        if "tiers" in data:
            try:
                tiers = tiers_from_list(data["tiers"], f"{file}: tiers")
            except TierError as exc:
                raise ConfigError(str(exc)) from None
        pools_data = data.get("pools")
        for section, body in data.items():
            if section in ("tiers", "pools"):
                continue
            if section not in SECTIONS:
                raise ConfigError(f"{file}: unknown section {section!r} (sections: {', '.join([*SECTIONS, 'tiers', 'pools'])})")
            if not isinstance(body, dict):
                raise ConfigError(f"{file}: section {section!r} must be a mapping")
            for k, v in body.items():
                if k in RENAMED:
                    raise ConfigError(f"{file}: {section}.{k} is now called {section}.{RENAMED[k]}; rename the key")
                if k not in keys or keys[k][0] != section:
                    raise ConfigError(f"{file}: unknown key {section}.{k}")
                values[section][k] = _convert(f"{section}.{k}", v, keys[k][1].type)
    for k, (section, f) in keys.items():
        ev = env.get("TOKENFAB_" + k.upper())
        if ev is not None:
            values[section][k] = _convert("TOKENFAB_" + k.upper(), ev, f.type)
    for k, v in (cli or {}).items():
        if v is None:
            continue
        if k not in keys:
            raise ConfigError(f"unknown setting --{k.replace('_', '-')}")
        section, f = keys[k]
        values[section][k] = _convert("--" + k.replace("_", "-"), v, f.type)
    pools = pools_from_list(pools_data, f"{file}: pools", tiers) if pools_data is not None else ()
    settings = Settings(**{name: cls(**values[name]) for name, cls in SECTIONS.items()}, tiers=tiers, pools=pools)
    lc = settings.ledger
    if lc.checkpoint_interval_s <= 0 or lc.reservation_lease_s < 3 * lc.checkpoint_interval_s:
        raise ConfigError(f"reservation_lease_s ({lc.reservation_lease_s:g}) must be at least 3 x checkpoint_interval_s "
                          f"({lc.checkpoint_interval_s:g} s, > 0): a live server renews its leases at every checkpoint")
    fc = settings.fleet
    from tokenfab.fleet.router import POLICIES  # pure

    if fc.route_policy not in POLICIES:
        raise ConfigError(f"route_policy {fc.route_policy!r} is not one of {', '.join(POLICIES)}")
    try:
        weights = [float(w) for w in fc.route_weights.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3 or any(not (w >= 0) for w in weights):
        raise ConfigError(f"route_weights must be three weights >= 0 (queue, KV cache free, prefix), got "
                          f"{fc.route_weights!r}")
    if fc.prefix_block_tokens < 1 or fc.prefix_index_blocks < 1 or fc.workers < 0 or fc.worker_threads < 1:
        raise ConfigError("prefix_block_tokens and prefix_index_blocks must be >= 1, workers >= 0, worker_threads >= 1")
    if fc.health_interval_s <= 0 or fc.metrics_interval_s < 0:
        raise ConfigError("health_interval_s must be > 0 and metrics_interval_s >= 0")
    anon = settings.ledger.anonymous_tier
    if anon and anon not in tiers.names:
        raise ConfigError(f"anonymous_tier {anon!r} is not a tier ({', '.join(tiers.names)}); use \"\" to require keys")
    return settings
