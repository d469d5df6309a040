"""Engine configuration (one frozen dataclass) and the architecture description of a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama-family decoder (SmolLM2, Llama 3, Qwen 2, Mistral)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen form of HF's rope_scaling dict
    max_position: int = 8192
    tie_embeddings: bool = True
    attention_bias: bool = False

    @property
    def num_params(self) -> int:
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * (h + 2 * kv) * hd + h * hd * d
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, at 2 bytes per element (bf16/fp16)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2


# SmolLM2-135M's shape, used for the synthetic fallback so that compute per token is identical.
SMOLLM2_135M = ModelArgs(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_eps=1e-5,
    rope_theta=100000.0,
    max_position=8192,
    tie_embeddings=True,
)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to run; the server builds it from tokenfab.yaml / env / flags."""

    model: str = "smollm2-135m-instruct"  # bundled name, "synthetic", or a path (GGUF file or HF folder)
    device: str = "cpu"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    linear_kernel: str = "auto"  # auto | dense | int8 (auto: int4 for GGUF Q4_1 weights, else int8, weight-only, for small batches; dense for large)
    small_batch_max_tokens: int = -1  # with linear_kernel=auto, token counts up to this use the weight-only kernel; -1: by CPU (12, or 4 with AMX)
    block_size: int = 16
    num_kv_blocks: int = 0  # 0: derive from kv_cache_gb
    kv_cache_gb: float = 1.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 1024  # per-step token budget (prefill chunks + decodes)
    max_model_len: int = 4096
    enable_prefix_caching: bool = True
    threads: int = 0  # 0: torch default (all cores)
    seed: int = 0  # seed of the synthetic fallback weights
    synthetic_layers: int = 0  # 0: the full SmolLM2-135M shape; >0: a smaller synthetic model (tests)
    cache_dir: str = ""  # where dequantised weights / tokenizer are cached; "" = ~/.cache/tokenfab
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def resolve_small_batch_max_tokens(value: int) -> int:
    """-1 picks by CPU: the int4 kernel beats bf16 matmuls up to ~14 tokens on the AMD EPYC VM, but only
    up to ~5 on the Xeon with AMX, whose pre-packed bf16 matmuls are faster (docs/performance.md)."""
    if value < -1:
        raise ValueError(f"small_batch_max_tokens must be -1 (by CPU) or a token count >= 0, got {value}")
    if value >= 0:
        return value
    from tokenfab.engine.cpu_kernels import has_amx

    return 4 if has_amx() else 12
