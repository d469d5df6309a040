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

from tokenfab.engine.config import EngineConfig


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = ""  # "" = the loaded model's own name
    max_body_bytes: int = 4 * 1024 * 1024
    max_waiting: int = 512  # requests queued beyond this are answered 429 with Retry-After
    log_level: str = "info"


@dataclass(frozen=True)
class Settings:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


SECTIONS = {"server": ServerConfig, "engine": EngineConfig}


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
        for section, body in data.items():
            if section not in SECTIONS:
                continue  # sections owned by other parts (tiers, ledger, ...) are read by them
            if not isinstance(body, dict):
                raise ConfigError(f"{file}: section {section!r} must be a mapping")
            for k, v in body.items():
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
    return Settings(server=ServerConfig(**values["server"]), engine=EngineConfig(**values["engine"]))
