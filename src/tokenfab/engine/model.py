"""The Llama-family decoder (RMSNorm, RoPE with scaling, GQA, SwiGLU, tied embeddings) over a paged KV cache.

Tokens of all sequences in a step are packed into one flat batch for every matmul; attention is
done per group: one batched call for all single-token (decode) rows, one call per multi-token
(prefill chunk) row. Linear layers choose their kernel by the number of tokens in the step:
weight-only int4 (GGUF Q4_1 tensors) or int8 for small batches (memory-bound), dense for large ones
(compute-bound); both kernels compute with the same rounded weights, so the choice changes speed,
not the function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenfab.engine import cpu_kernels
from tokenfab.engine.config import ModelArgs


INT4_GROUP = 32
PREFILL_BLOCK = 256  # query rows per block in prefill attention
SMALL_DECODE_KEYS = 1024  # decode steps with at most this many keys (sequences x context) attend in fp32
LAYERNORM_FORM_MAX_TOKENS = 32  # RMSNorm as one LayerNorm kernel up to this many tokens (crossover ~48 here)


def _as_int4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q [N, K] int32 in 0..15, scales_and_zeros [K/32, N, 2]) if `w` already lies on a 4-bit grid.

    A GGUF Q4_1 tensor is 16 levels per block of 32 weights with the block's min and max as its end
    levels, so after dequantisation each group's values are exactly min + d * q, d = (max - min) / 15. Such a weight is re-packed
    for torch's int4 weight-only kernel without further rounding; any other weight returns None
    (rounding it to 4 bits would change the model, so it keeps the int8 kernel).
    """
    n, k = w.shape
    if k % INT4_GROUP or n % 16:
        return None
    g = w.float().view(n, k // INT4_GROUP, INT4_GROUP)
    lo = g.amin(-1, keepdim=True)
    d = ((g.amax(-1, keepdim=True) - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo) / d).clamp(0, 15)
    # values already on the grid round back within their storage precision (bf16: ~15 d / 256)
    if ((q * d + lo - g).abs() > 0.1 * d).any():
        return None
    scales = d.squeeze(-1).to(w.dtype)
    zeros = (lo.squeeze(-1) + 8.0 * scales.float()).to(w.dtype)  # the kernel computes (q - 8) * scale + zero
    return q.view(n, k).to(torch.int32), torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


PACK_BATCH_HINT = 64  # oneDNN picks its blocked weight layout for this many rows; any row count works


def _prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's blocked layout (bf16 on CPU), packed once instead of on every call, or None
    where that is unavailable or does not reproduce F.linear on a probe.

    torch's F.linear hands oneDNN the plain [N, K] weight and oneDNN re-blocks it on each call. Measured
    side by side on the 2-core Intel Xeon VM with AMX, 2026-11-29 (SmolLM2's 30 layers + LM head, the bound
    of `benchmarks/engine.py`, bf16):
    64 tokens 33.6-38.3 ms packed vs 49.4-50.2 ms plain; 16 tokens 23.4-24.7 vs 30.0-32.0 ms; the
    outputs are bit-identical.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        same = torch.equal(torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], ""), F.linear(probe, weight))
    except (RuntimeError, AttributeError, NotImplementedError):  # no mkldnn ops in this torch build
        return None
    return packed if same else None


class Linear:
    """y = x @ W.T (+ b), with a weight-only low-bit kernel for small token counts.

    `kernel`: "dense" (plain matmul), "int8" (int8 weight-only for every batch), or "auto": for up to
    `small_max_tokens` tokens, int4 weight-only where the weights already lie on a 4-bit grid (GGUF
    Q4_1 tensors), int8 per-channel otherwise; dense above. The dense path uses the same rounded
    weights as the small-batch kernel, so the choice changes speed, not the function. On the CPU in
    bf16 the dense weight is held pre-packed for oneDNN (`_prepack`); `weight` then unpacks a copy.
    """

    __slots__ = ("_weight", "packed", "bias", "kind", "w_q", "scales", "small_max_tokens")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str, small_max_tokens: int) -> None:
        self.bias = bias
        self.kind = "dense"
        self.w_q: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.small_max_tokens = 0
        if kernel in ("int8", "auto") and weight.device.type == "cpu":
            packed = _as_int4_groups(weight) if kernel == "auto" else None
            if packed is not None:
                q, sz = packed
                self.kind = "int4"
                self.w_q = torch._convert_weight_to_int4pack_for_cpu(q, 1)
                self.scales = sz
                n, k = q.shape
                s, z = sz[..., 0].float().t(), sz[..., 1].float().t()  # [N, K/32]
                deq = (q.view(n, k // INT4_GROUP, INT4_GROUP).float() - 8.0) * s[..., None] + z[..., None]
                weight = deq.view(n, k).to(weight.dtype)
            else:
                w = weight.float()
                scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
                self.kind = "int8"
                self.w_q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
                self.scales = scales.to(weight.dtype)
                weight = (self.w_q.float() * scales[:, None]).to(weight.dtype)
            self.small_max_tokens = 1 << 30 if kernel == "int8" else small_max_tokens
        weight = weight.contiguous()
        self.packed = _prepack(weight) if self.small_max_tokens < 1 << 30 else None
        self._weight = None if self.packed is not None else weight  # one copy of the weights, not two

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight (a fresh copy when it is held packed)."""
        return self._weight if self._weight is not None else self.packed.to_dense()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.small_max_tokens:
            x = x.contiguous()  # the weight-only kernels need it; rms_norm's output is a strided half
            if self.kind == "int4":
                y = torch._weight_int4pack_mm_for_cpu(x, self.w_q, INT4_GROUP, self.scales)
            else:
                y = torch._weight_int8pack_mm(x, self.w_q, self.scales)
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self._weight, self.bias)


def rms_norm(x: torch.Tensor, weight2: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm; for small token counts computed as a LayerNorm of [x, -x] (whose mean is exactly 0,
    so its variance is mean(x^2)), which is one fused kernel where F.rms_norm is several.

    `weight2` is the norm weight repeated twice. Measured side by side on the 2-core AMD EPYC VM (bf16, 576
    wide, `benchmarks/engine_kernels.py`): 5.7 vs 10.1 us at 1 token, even at ~48 tokens, and
    F.rms_norm ahead above (140 vs 220 us at 1,024); the results are identical.
    """
    d = x.shape[-1]
    if x.shape[0] > LAYERNORM_FORM_MAX_TOKENS:
        return F.rms_norm(x, (d,), weight2[:d], eps)
    return F.layer_norm(torch.cat((x, -x), dim=-1), (2 * d,), weight2, None, eps)[..., :d]


def norm_weight(weight: torch.Tensor) -> torch.Tensor:
    """The form `rms_norm` takes."""
    return torch.cat((weight, weight)).contiguous()


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    hd = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = dict(args.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    return inv.float()


@dataclass
class AttnGroup:
    """Attention work for one step, shared by every layer."""

    dec_rows: torch.Tensor | None  # [Bd] indices into the flat token batch
    dec_blocks: torch.Tensor | None  # [2 x Bd x KV heads x blocks] rows of the cache's (head, block) view
    dec_bias: torch.Tensor | None  # [Bd, 1, 1, Lmax] model dtype: 0 for real keys, -inf for padding; None if none
    dec_len: int  # Lmax: blocks per sequence x block size
    # (row start, n rows, context slots or None when the chunk is the whole context, tokens before the chunk)
    prefills: list[tuple[int, int, torch.Tensor | None, int]]
    block_size: int = 16
    # for the built CPU kernel, which reads the cache in place (then dec_blocks and dec_bias are None)
    dec_tables: torch.Tensor | None = None  # [Bd, blocks] int64 block ids, padded with 0
    dec_lens: torch.Tensor | None = None  # [Bd] int64 keys per sequence


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    logits_rows: torch.Tensor  # [S] rows whose next-token logits are needed
    attn: AttnGroup


class LlamaModel:
    def __init__(
        self,
        args: ModelArgs,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        kernel: str = "auto",
        small_batch_max_tokens: int = 12,
    ) -> None:
        self.args = args
        self.dtype = dtype
        self.device = device

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype)

        def lin(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
            return Linear(weight, bias, kernel if device.type == "cpu" else "dense", small_batch_max_tokens)

        self.embed = w("embed")
        self.layers = []
        for i in range(args.num_layers):
            p = f"layers.{i}."
            qkv = torch.cat([w(p + "q"), w(p + "k"), w(p + "v")], dim=0)
            qkv_b = None
            if args.attention_bias:
                qkv_b = torch.cat([w(p + "q_bias"), w(p + "k_bias"), w(p + "v_bias")], dim=0)
            self.layers.append(
                (
                    norm_weight(w(p + "attn_norm")),
                    lin(qkv, qkv_b),
                    lin(w(p + "o")),
                    norm_weight(w(p + "ffn_norm")),
                    lin(torch.cat([w(p + "gate"), w(p + "up")], dim=0)),
                    lin(w(p + "down")),
                )
            )
        self.norm = norm_weight(w("norm"))
        self.lm_head = lin(w("lm_head") if "lm_head" in weights else self.embed)
        self.inv_freq = rope_inv_freq(args).to(device)
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        # where the CPU kernels build (cpu_kernels.py): decode attention reads the paged cache in place, and
        # norm, RoPE + cache write and SiLU x up run as one fused pass each
        self.use_cpu_kernels = cpu_kernels.supports(dtype, device)
        self.kernels = cpu_kernels.ops() if self.use_cpu_kernels else None
        # prefill attention of a whole prompt: torch's SDPA (flash attention) on GPUs and on CPUs with AMX,
        # where it is faster; the blocked bf16 form below elsewhere (measured: docs/performance.md)
        self.prefill_sdpa = device.type == "cuda" or (device.type == "cpu" and cpu_kernels.has_amx())

    def allocate_kv(self, num_slots: int) -> list[torch.Tensor]:
        a = self.args
        # one tensor per layer, [K heads then V heads, slots, head dim]: one index_copy_ writes a step's
        # keys and values, one index_select gathers both, already batched by (kv head, sequence)
        shape = (2 * a.num_kv_heads, num_slots, a.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(a.num_layers)]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation tables for this step, in the form the path in use takes."""
        if self.use_cpu_kernels:  # (cos, sin), each [T, hd / 2] fp32
            freqs = positions.float()[:, None] * self.inv_freq[None, :]
            return freqs.cos(), freqs.sin()
        return self.rope_tables(positions)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each [T, 1, head dim] in the model dtype: rope(x) = x * cos + roll(x, hd / 2) * signed sin."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        cos, sin = freqs.cos(), freqs.sin()
        return (torch.cat((cos, cos), -1).to(self.dtype)[:, None, :],
                torch.cat((-sin, sin), -1).to(self.dtype)[:, None, :])

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # rotate-half ("neox") layout, as in Hugging Face checkpoints; GGUF Q/K are un-permuted at load.
        # roll by half a head gives (x2, x1); with the signed sin that is rotate_half(x) * sin
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin

    @staticmethod
    def _apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """In place, in three kernels (the out-of-place form takes eight)."""
        rolled = x.roll(x.shape[-1] // 2, dims=-1)
        x.mul_(cos).addcmul_(rolled, sin)

    def _decode_attention(self, q: torch.Tensor, cache: torch.Tensor, g: AttnGroup) -> torch.Tensor:
        """One query per sequence over its paged context: two batched matmuls per (sequence, kv head).

        Measured on the 2-core CPU (bf16, 9 query / 3 KV heads): torch's SDPA with one query row costs
        35 us at 64 keys but 870 us at 2,000, the two matmuls 37 us and 69 us; with a padding mask SDPA
        is slower still (it materialises and converts the mask on every call). Scores stay in the model
        dtype (as in prefill attention); the softmax runs in fp32 inside.
        """
        a = self.args
        kvh, hd, rep = a.num_kv_heads, a.head_dim, a.num_heads // a.num_kv_heads
        if g.dec_tables is not None:  # set only when the CPU kernels are in use
            return self.kernels.decode_attention(q, cache, g.dec_tables, g.dec_lens, g.block_size, kvh, hd**-0.5)
        bd, lmax, bs = q.shape[0], g.dec_len, g.block_size
        # whole blocks in one gather, ordered (K or V, sequence, kv head, block): one row per block is
        # ~16x fewer and larger copies than one per token, and the order makes K and V per
        # (sequence, head) contiguous, so the output needs no transpose
        kv = cache.view(cache.shape[0] * (cache.shape[1] // bs), bs * hd).index_select(0, g.dec_blocks)
        kv = kv.view(2, bd * kvh, lmax, hd)
        small = bd * lmax <= SMALL_DECODE_KEYS
        if small:  # tiny batched matmuls: fp32 ones cost a quarter of bf16 ones here, conversion included
            kv = kv.float()
        qq = (q.view(bd, kvh, rep, hd) * hd**-0.5).view(bd * kvh, rep, hd)  # one copy, scaled
        scores = torch.bmm(qq.float() if small else qq, kv[0].transpose(1, 2))
        if g.dec_bias is not None:
            scores.view(bd, kvh, rep, lmax).add_(g.dec_bias)
        probs = scores.softmax(-1)
        out = torch.bmm(probs, kv[1]).view(bd, kvh * rep, hd)
        return out.to(q.dtype) if small else out

    def _prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
        """Causal attention of a chunk of `n` queries (positions past..past+n-1) over keys 0..past+n-1.

        q: [n, heads, hd]; k, v: [kv heads, past + n, hd]. Queries go in blocks of PREFILL_BLOCK rows,
        each over only the keys it can see (so the causal upper triangle is skipped block-wise), with
        two batched matmuls per block in the model dtype and the softmax computed in fp32.
        The scores leave the QK matmul in the model dtype: for bf16 that rounds them to 8 bits of
        mantissa, the same relative precision q and k already carry, and on the AMD EPYC VM it makes
        prefill attention 1.6-2.4x faster than torch's CPU flash attention (22 or 14.7 vs 35 ms per layer
        at 2,048 tokens). The probabilities are rounded to the model dtype for the second matmul, as GPU
        flash attention does. Where `prefill_sdpa` is set (GPUs; CPUs with AMX, where SDPA measured
        1.4-2.7x faster at 128-2,048 tokens), a chunk that starts the prompt goes to SDPA instead.
        """
        if past == 0 and self.prefill_sdpa:  # causal from the first key: SDPA's top-left mask is right
            return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True,
                                                  enable_gqa=True)[0].transpose(0, 1)
        a = self.args
        kvh, hd, rep = a.num_kv_heads, a.head_dim, a.num_heads // a.num_kv_heads
        n = q.shape[0]
        qg = (q * hd**-0.5).view(n, kvh, rep, hd).transpose(0, 1)  # [kvh, n, rep, hd]; the scale is exact in bf16
        kt = k.transpose(1, 2)  # [kvh, hd, L]
        out = torch.empty(n, kvh, rep, hd, dtype=q.dtype, device=q.device)
        for s in range(0, n, PREFILL_BLOCK):
            e = min(n, s + PREFILL_BLOCK)
            m, kend = e - s, past + e
            scores = torch.bmm(qg[:, s:e].reshape(kvh, m * rep, hd), kt[:, :, :kend]).view(kvh, m, rep, kend)
            # this block's own keys: query i sees keys up to past + s + i
            tri = torch.ones(m, m, dtype=torch.bool, device=q.device).triu_(1)
            scores[..., past + s :].masked_fill_(tri[None, :, None, :], float("-inf"))
            probs = scores.softmax(-1).view(kvh, m * rep, kend)  # fp32 inside, model dtype out
            out[s:e] = torch.bmm(probs, v[:, :kend]).view(kvh, m, rep, hd).transpose(0, 1)
        return out.view(n, kvh * rep, hd)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: list[torch.Tensor]) -> torch.Tensor:
        a = self.args
        h, kvh, hd = a.num_heads, a.num_kv_heads, a.head_dim
        t = batch.input_ids.shape[0]
        fused = self.use_cpu_kernels
        x = self.embed[batch.input_ids]  # a fresh tensor: the residual stream, updated in place
        cos, sin = self._rope(batch.positions)
        g = batch.attn
        only_decodes = not g.prefills  # then the decode rows are the whole batch, in order
        delta = None  # what the previous block adds to the residual stream
        for (attn_norm, qkv_proj, o_proj, ffn_norm, gate_up, down), cache in zip(self.layers, kv):
            hs = self._add_norm(x, delta, attn_norm)
            qkv = qkv_proj(hs).view(t, h + 2 * kvh, hd)
            if fused:
                self.kernels.rope_and_cache(qkv, cos, sin, batch.slot_mapping, cache, h, kvh)
            else:
                # Q and K sit side by side in the fused projection: rotate them in one pass, in place,
                # so that K and V stay adjacent and go to the cache in one copy
                self._apply_rope_(qkv[:, : h + kvh], cos, sin)
                cache.index_copy_(1, batch.slot_mapping, qkv[:, h:].transpose(0, 1))
            q = qkv[:, :h]
            if only_decodes:
                out = self._decode_attention(q, cache, g)
            else:
                out = torch.empty(t, h, hd, dtype=x.dtype, device=x.device)
                if g.dec_rows is not None:
                    out.index_copy_(0, g.dec_rows, self._decode_attention(q.index_select(0, g.dec_rows), cache, g))
                for start, n, slots, past in g.prefills:
                    if slots is None:  # the chunk is the whole context: its own keys and values
                        kvp = qkv[start : start + n, h:].transpose(0, 1)
                    else:
                        kvp = cache.index_select(1, slots)
                    out[start : start + n] = self._prefill_attention(q[start : start + n], kvp[:kvh], kvp[kvh:], past)
            delta = o_proj(out.reshape(t, h * hd))
            hs = self._add_norm(x, delta, ffn_norm)
            gu = gate_up(hs)
            if fused:
                act = self.kernels.silu_mul(gu)
            else:
                f = gu.shape[1] // 2
                act = F.silu(gu[:, :f]) * gu[:, f:]
            delta = down(act)
        if batch.logits_rows.numel() == 0:
            return torch.empty(0, self.args.vocab_size, dtype=self.dtype)
        x = x.index_select(0, batch.logits_rows) + delta.index_select(0, batch.logits_rows)
        x = self._add_norm(x, None, self.norm)
        return self.lm_head(x)  # model dtype; the sampler upcasts only rows that need it

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight2: torch.Tensor) -> torch.Tensor:
        """x += delta (in place, when given), then RMSNorm(x)."""
        if self.use_cpu_kernels:
            return self.kernels.add_rms_norm(x, delta, weight2, self.args.rms_eps)
        if delta is not None:
            x.add_(delta)
        return rms_norm(x, weight2, self.args.rms_eps)
