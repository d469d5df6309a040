"""The engine's kernel choices, each side by side with the alternative it replaced, in one process.

    python benchmarks/engine_kernels.py [--threads 2]

Each row times both variants alternately (medians of many calls) on the same inputs:
  * SmolLM2-135M's matmuls at 1 token: bf16 dense vs int8 vs int4 weight-only (30 layers + LM head);
  * prefill attention at 2,048 tokens, one layer: torch SDPA (flash, causal) vs the engine's blocked
    bf16 attention (`LlamaModel._prefill_attention`);
  * decode attention for 1 sequence of 192 keys: bf16 vs fp32 batched matmuls;
  * RMSNorm at 1 and 1,024 tokens: `F.rms_norm` vs the engine's `rms_norm` (a LayerNorm of [x, -x] up to
    32 tokens, `F.rms_norm` above);
  * greedy sampling over 64 x 49,152 bf16 logits: `argmax` vs `max(dim).indices`;
  * the built CPU kernels (`tokenfab.engine.cpu_kernels`) against the torch ops they replace, at 64
    decoding sequences (the 64-stream benchmark's shape): paged decode attention (gather + batched
    matmuls vs reading blocks in place), residual add + RMSNorm, RoPE + KV-cache write, SiLU x up and
    the greedy argmax;
and, on the real bundled model, the accuracy of blocked prefill attention against an fp32 forward
(mean KL and top-1 agreement over 1,500 tokens of this repository's docs), next to SDPA's.
The glibc allocator setting (`tokenfab.engine.cpu_memory`) is process-wide and is on here, as in the
engine; its own effect needs two processes and is not measured by this script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def pair(name: str, old: tuple[str, object], new: tuple[str, object], reps: int, unit: float = 1e3,
         suffix: str = "ms") -> None:
    """Time two variants in alternating rounds; print medians and the ratio."""
    a, b = [], []
    for _ in range(3):
        a.append(timed(old[1], reps))
        b.append(timed(new[1], reps))
    ta, tb = statistics.median(a), statistics.median(b)
    print(f"| {name} | {old[0]} {ta * unit:.3g} {suffix} | {new[0]} {tb * unit:.3g} {suffix} | {ta / tb:.2f}x |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from tokenfab.engine import cpu_kernels
    from tokenfab.engine.config import EngineConfig
    from tokenfab.engine.cpu_memory import keep_freed_memory
    from tokenfab.engine.loader import load_model
    from tokenfab.engine.model import AttnGroup, LlamaModel, StepBatch, norm_weight, rms_norm
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from engine import MatmulBound  # benchmarks/engine.py

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads; CPU kernels: {cpu_kernels.describe()}")
    print("| what | before | after | speed-up |")
    print("|---|---|---|---|")

    mb = MatmulBound(args.threads)
    pair("SmolLM2 matmuls, 1 token", ("bf16", lambda: mb.step(1, "bf16")), ("int8", lambda: mb.step(1, "int8")), 20)
    pair("SmolLM2 matmuls, 1 token", ("int8", lambda: mb.step(1, "int8")), ("int4", lambda: mb.step(1, "int4")), 20)
    del mb

    lm = load_model(EngineConfig())
    model = LlamaModel(lm.args, lm.weights, torch.bfloat16, torch.device("cpu"), "dense", 0)
    a = lm.args
    t = 2048
    q = torch.randn(t, a.num_heads, a.head_dim, generator=g).bfloat16()
    k = torch.randn(a.num_kv_heads, t, a.head_dim, generator=g).bfloat16()
    v = torch.randn(a.num_kv_heads, t, a.head_dim, generator=g).bfloat16()

    def sdpa(q=q, k=k, v=v):
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True,
                                              enable_gqa=True)[0].transpose(0, 1)

    pair("prefill attention, 2,048 tokens, 1 layer", ("SDPA", sdpa),
         ("blocked", lambda: model._prefill_attention(q, k, v, 0)), 3)

    kv = torch.randn(2, a.num_kv_heads, 192, a.head_dim, generator=g).bfloat16()
    qd = torch.randn(a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_dim, generator=g).bfloat16()

    def dec_bf16():
        return torch.bmm(torch.bmm(qd, kv[0].transpose(1, 2)).softmax(-1), kv[1])

    def dec_f32():
        kf = kv.float()
        return torch.bmm(torch.bmm(qd.float(), kf[0].transpose(1, 2)).softmax(-1), kf[1]).bfloat16()

    pair("decode attention, 1 sequence x 192 keys", ("bf16", dec_bf16), ("fp32", dec_f32), 500, 1e6, "us")

    w = torch.rand(a.hidden_size, generator=g).bfloat16() + 0.5
    w2 = norm_weight(w)
    for n in (1, 1024):
        x = torch.randn(n, a.hidden_size, generator=g).bfloat16()
        pair(f"RMSNorm, {n} token(s)", ("F.rms_norm", lambda x=x: F.rms_norm(x, (x.shape[-1],), w, a.rms_eps)),
             ("engine rms_norm", lambda x=x: rms_norm(x, w2, a.rms_eps)), 200, 1e6, "us")

    logits = torch.randn(64, a.vocab_size, generator=g).bfloat16()
    pair("greedy pick, 64 x vocab bf16", ("argmax", lambda: logits.argmax(-1)),
         ("max().indices", lambda: logits.max(-1).indices), 50)

    built_kernels(model, a, g, logits)

    # accuracy on the real model: all-position log-probs against an fp32 forward
    ids = lm.tokenizer.encode((ROOT / "docs" / "performance.md").read_text()[:9000])[:1500]
    n = len(ids)

    def logprobs(dtype: torch.dtype, sdpa_attention: bool = False) -> torch.Tensor:
        m = LlamaModel(lm.args, lm.weights, dtype, torch.device("cpu"), "dense", 0)
        if sdpa_attention:
            m._prefill_attention = lambda q, k, v, past: sdpa(q, k, v)  # type: ignore[method-assign]
        batch = StepBatch(torch.tensor(ids), torch.arange(n), torch.arange(n), torch.arange(n),
                          AttnGroup(None, None, None, 0, [(0, n, None, 0)], 16))
        return m.forward(batch, m.allocate_kv(n)).float().log_softmax(-1)

    ref = logprobs(torch.float32)
    print(f"\nAccuracy against an fp32 forward, {n} tokens of real text (bf16 model):")
    print("| prefill attention | mean KL | max KL | top-1 agreement |")
    print("|---|---|---|---|")
    runs = [("SDPA", logprobs(torch.bfloat16, True)), ("blocked", logprobs(torch.bfloat16))]
    if cpu_kernels.available():  # the CPU kernels change norm, RoPE and SiLU rounding: compare those too
        saved = cpu_kernels.supports
        cpu_kernels.supports = lambda *a: False  # type: ignore[assignment]
        runs.append(("blocked, torch ops for norm/RoPE/SiLU", logprobs(torch.bfloat16)))
        cpu_kernels.supports = saved  # type: ignore[assignment]
    for name, lp in runs:
        kl = (ref.exp() * (ref - lp)).sum(-1)
        top = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"| {name} | {kl.mean():.5f} | {kl.max():.4f} | {top:.1%} |")
    return 0


def built_kernels(model, a, g: torch.Generator, logits: torch.Tensor) -> None:
    """The CPU kernels against the torch ops they replace, at 64 decoding sequences."""
    import numpy as np

    from tokenfab.engine import cpu_kernels
    from tokenfab.engine.model import AttnGroup

    if not cpu_kernels.available():
        print(f"| CPU kernels | not built: {cpu_kernels.describe()} | | |")
        return
    ops = cpu_kernels.ops()
    b, bs, h, kvh, hd = 64, 16, a.num_heads, a.num_kv_heads, a.head_dim
    nblocks = 4096  # a cache far larger than the live blocks, as in the engine
    cache = torch.randn(2 * kvh, nblocks * bs, hd, generator=g).bfloat16()
    lens = np.array([48 + (i * 7) % 33 for i in range(b)], dtype=np.int64)  # 48..80 keys
    nb = int(-(-lens.max() // bs))
    perm = torch.randperm(nblocks, generator=g).numpy()
    tables = np.zeros((b, nb), dtype=np.int64)
    used = 0
    for i, n in enumerate(lens):
        k = int(-(-n // bs))
        tables[i, :k] = perm[used : used + k]
        used += k
    part = np.arange(2)[:, None, None, None] * kvh
    head = np.arange(kvh)[None, None, :, None]
    rows = torch.from_numpy(((part + head) * nblocks + tables[None, :, None, :]).ravel())
    lmax = nb * bs
    pad = np.where(np.arange(lmax)[None, :] < lens[:, None], 0.0, -np.inf).astype(np.float32)
    bias = torch.from_numpy(pad).bfloat16().view(b, 1, 1, lmax)
    qkv = torch.randn(b, h + 2 * kvh, hd, generator=g).bfloat16()
    q = qkv[:, :h]
    gathered = AttnGroup(None, rows, bias, lmax, [], bs)
    paged = AttnGroup(None, None, None, lmax, [], bs, torch.from_numpy(tables), torch.from_numpy(lens))
    model.kernels = ops  # the group decides the path: block rows to gather, or tables for the kernel
    pair("decode attention, 64 sequences x 48-80 keys, 1 layer",
         ("gather + bmm", lambda: model._decode_attention(q, cache, gathered)),
         ("CPU kernel", lambda: model._decode_attention(q, cache, paged)), 50, 1e6, "us")

    x = torch.randn(b, a.hidden_size, generator=g).bfloat16()
    d = torch.randn(b, a.hidden_size, generator=g).bfloat16()
    w2 = torch.cat([torch.rand(a.hidden_size, generator=g).bfloat16() + 0.5] * 2)

    def norm_torch():
        y = x.clone()
        return rms_norm_torch(y.add_(d), w2, a.rms_eps)

    pair("residual add + RMSNorm, 64 tokens", ("torch", norm_torch),
         ("CPU kernel", lambda: ops.add_rms_norm(x.clone(), d, w2, a.rms_eps)), 300, 1e6, "us")

    pos = torch.arange(b) + 60
    cos_t, sin_t = model.rope_tables(pos)
    freqs = pos.float()[:, None] * model.inv_freq[None, :]
    cos_k, sin_k = freqs.cos(), freqs.sin()
    slots = torch.from_numpy(tables[:, 0] * bs + 3)

    def rope_torch():
        model._apply_rope_(qkv[:, : h + kvh], cos_t, sin_t)
        cache.index_copy_(1, slots, qkv[:, h:].transpose(0, 1))

    pair("RoPE + KV-cache write, 64 tokens", ("torch", rope_torch),
         ("CPU kernel", lambda: ops.rope_and_cache(qkv, cos_k, sin_k, slots, cache, h, kvh)), 300, 1e6, "us")

    gu = torch.randn(b, 2 * a.intermediate_size, generator=g).bfloat16()
    f = a.intermediate_size
    pair("SiLU(gate) x up, 64 tokens", ("torch", lambda: F.silu(gu[:, :f]) * gu[:, f:]),
         ("CPU kernel", lambda: ops.silu_mul(gu)), 300, 1e6, "us")
    pair("greedy pick, 64 x vocab bf16", ("max().indices", lambda: logits.max(-1).indices),
         ("CPU kernel", lambda: ops.argmax_rows(logits)), 50)


def rms_norm_torch(x: torch.Tensor, w2: torch.Tensor, eps: float) -> torch.Tensor:
    from tokenfab.engine.model import rms_norm

    return rms_norm(x, w2, eps)


if __name__ == "__main__":
    sys.exit(main())
