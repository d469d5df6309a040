"""Hardware and model catalogs (YAML data in this package, plus user files); lookups suggest close matches."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

BYTES_PER_PARAM = {"fp4": 0.5625, "fp8": 1.0, "int8": 1.0, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0}  # fp4 incl. scales


class CatalogError(ValueError):
    pass


@dataclass(frozen=True)
class Hardware:
    name: str
    kind: str  # gpu | sram | cpu
    memory_gb: float
    mem_bw_tb_s: float
    tflops: dict[str, float]
    scaleup_domain: int
    scaleup_bw_gb_s: float
    tdp_w: float
    kw_all_in: float
    usd_per_device_hour: float
    aliases: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def peak_tflops(self, precision: str) -> float:
        if precision in self.tflops:
            return self.tflops[precision]
        # no native support: run at the next wider precision the device has
        for wider in ("fp8", "bf16", "fp16", "fp32"):
            if BYTES_PER_PARAM.get(wider, 9) >= BYTES_PER_PARAM[precision] and wider in self.tflops:
                return self.tflops[wider]
        raise CatalogError(f"{self.name} lists no compute for {precision} (has {', '.join(self.tflops)})")


@dataclass(frozen=True)
class Model:
    name: str
    total_params_b: float
    active_params_b: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    kv_elems_per_token_layer: int
    vocab: int
    expert_params_b: float = 0.0
    experts: int = 0
    experts_active: int = 0
    # Decode attention per head: dims of q.k and of the values it reads. 0 means head_dim; MLA run
    # absorbed (DeepSeek) scores against the cached latent + rope part (576) and sums 512-wide values.
    attn_qk_dim: int = 0
    attn_v_dim: int = 0
    sliding_window: int = 0  # tokens a sliding-window layer attends to (0: none)
    sliding_layers: int = 0  # how many of the layers use that window
    mtp_layers: int = 0  # multi-token-prediction heads shipped with the weights (speculative decoding drafts)
    # a 4-bit checkpoint of a MoE model commonly quantizes only the routed experts: the precision the rest
    # (attention, shared experts, dense layers) keeps at "fp4" ("" = all weights at the stated precision)
    fp4_dense_precision: str = ""
    # the precision a 4-bit checkpoint's expert matmuls compute at, where the serving stacks pair the 4-bit
    # weights with wider activations ("" = 4-bit activations too, as NVFP4 W4A4 checkpoints run)
    fp4_compute_precision: str = ""
    tied_embeddings: bool = False  # the LM head is the input embedding table
    aliases: tuple[str, ...] = ()
    source: str = ""

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def dense_params_b(self) -> float:
        """Parameters outside the routed experts (all of a dense model's)."""
        return self.total_params_b - self.expert_params_b

    @property
    def embedding_params_b(self) -> float:
        """One vocab x hidden table (the input embedding, or the LM head)."""
        return self.vocab * self.hidden / 1e9

    @property
    def table_params_b(self) -> float:
        """Parameters in the embedding and LM-head tables (one table when they are tied)."""
        return self.embedding_params_b * (1 if self.tied_embeddings else 2)

    @property
    def active_expert_params_b(self) -> float:
        """Routed-expert parameters one token uses."""
        return self.expert_params_b * self.experts_active / self.experts if self.is_moe else 0.0

    def dense_precision(self, precision: str) -> str:
        """The precision the non-expert weights are stored in when the checkpoint is at `precision`."""
        return self.fp4_dense_precision if precision == "fp4" and self.fp4_dense_precision else precision

    def expert_compute_precision(self, precision: str) -> str:
        """The precision the routed experts' matmuls run at when the checkpoint is at `precision`."""
        return self.fp4_compute_precision if precision == "fp4" and self.fp4_compute_precision else precision

    def kv_bytes_held(self, tokens: float, kv_bytes: float) -> float:
        """KV-cache bytes a sequence of `tokens` tokens holds: sliding-window layers keep only their window
        (TensorRT-LLM gives each window size its own pool; vLLM's hybrid KV cache manager reserves the
        window's slots only). A decode token reads all of it."""
        return self.attended(tokens) * self.kv_elems_per_token_layer * kv_bytes

    def attended(self, context: float) -> float:
        """Token-layers one new token attends to at `context`: sliding-window layers stop at their window."""
        full = self.layers - self.sliding_layers
        return full * context + self.sliding_layers * min(context, self.sliding_window or context)

    def decode_attention_flops(self, tokens: float, context: float) -> float:
        """FLOPs of decode attention for `tokens` new tokens at `context`: q.k and p.v per head."""
        qk, v = self.attn_qk_dim or self.head_dim, self.attn_v_dim or self.head_dim
        return 2.0 * tokens * self.attended(context) * self.heads * (qk + v)


def _load(text: str, key: str, cls: type) -> list[Any]:
    data = yaml.safe_load(text) or {}
    out = []
    for item in data.get(key, []):
        item = dict(item)
        item["aliases"] = tuple(item.get("aliases", ()))
        try:
            out.append(cls(**item))
        except TypeError as exc:
            raise CatalogError(f"{key} entry {item.get('name', '?')}: {exc}") from None
    return out


class Catalog:
    def __init__(self, hardware: list[Hardware], models: list[Model]) -> None:
        self.hardware = {h.name: h for h in hardware}
        self.models = {m.name: m for m in models}

    @classmethod
    def default(cls, extra: list[str | Path] = ()) -> Catalog:
        pkg = resources.files("tokenfab.perf")
        hw = _load(pkg.joinpath("hardware.yaml").read_text(), "hardware", Hardware)
        ms = _load(pkg.joinpath("models.yaml").read_text(), "models", Model)
        for p in extra:
            text = Path(p).read_text()
            hw += _load(text, "hardware", Hardware)
            ms += _load(text, "models", Model)
        return cls(hw, ms)

    @staticmethod
    def _find(kind: str, table: dict[str, Any], name: str) -> Any:
        low = name.lower()
        for item in table.values():
            if item.name.lower() == low or low in (a.lower() for a in item.aliases):
                return item
        names = list(table) + [a for it in table.values() for a in it.aliases]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CatalogError(f"unknown {kind} {name!r}{hint} (known: {', '.join(table)})")

    def hw(self, name: str) -> Hardware:
        return self._find("hardware", self.hardware, name)

    def model(self, name: str) -> Model:
        return self._find("model", self.models, name)
