"""The Llama-family decoder (RMSNorm, RoPE with scaling, GQA, SwiGLU, tied embeddings) over a paged KV cache.

Tokens of all sequences in a step are packed into one flat batch for every matmul; attention is
done per group: one batched call for all single-token (decode) rows, one call per multi-token
(prefill chunk) row. Linear layers choose their kernel by the number of tokens in the step:
int8 weight-only for small batches (memory-bound), dense for large ones (compute-bound); both
kernels compute with the same int8-rounded weights, so the choice changes speed, not the function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenfab.engine.config import ModelArgs


class Linear:
    """y = x @ W.T (+ b), with an optional int8 weight-only kernel for small token counts."""

    __slots__ = ("weight", "bias", "w_int8", "scales", "int8_max_tokens")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str, int8_max_tokens: int) -> None:
        self.bias = bias
        self.w_int8: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.int8_max_tokens = 0
        if kernel in ("int8", "auto") and weight.device.type == "cpu":
            w = weight.float()
            scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
            self.w_int8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scales = scales.to(weight.dtype)
            # the dense path uses the same rounded weights
            weight = (self.w_int8.float() * scales[:, None]).to(weight.dtype)
            self.int8_max_tokens = 1 << 30 if kernel == "int8" else int8_max_tokens
        self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_int8 is not None and x.shape[0] <= self.int8_max_tokens:
            y = torch._weight_int8pack_mm(x, self.w_int8, self.scales)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


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
    dec_slots: torch.Tensor | None  # [Bd * Lmax] cache slots to gather
    dec_bias: torch.Tensor | None  # [1, Bd, 1, Lmax] float32: 0 for real keys, -inf for padding
    dec_len: int
    # (row start, n rows, ctx slots or None when the chunk is the whole context, mask or None for causal)
    prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]


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
        int8_max_tokens: int = 12,
    ) -> None:
        self.args = args
        self.dtype = dtype
        self.device = device

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype)

        def lin(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
            return Linear(weight, bias, kernel if device.type == "cpu" else "dense", int8_max_tokens)

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
                    w(p + "attn_norm"),
                    lin(qkv, qkv_b),
                    lin(w(p + "o")),
                    w(p + "ffn_norm"),
                    lin(torch.cat([w(p + "gate"), w(p + "up")], dim=0)),
                    lin(w(p + "down")),
                )
            )
        self.norm = w("norm")
        self.lm_head = lin(w("lm_head") if "lm_head" in weights else self.embed)
        self.inv_freq = rope_inv_freq(args).to(device)
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim

    def allocate_kv(self, num_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        a = self.args
        # [kv heads, slots, head dim]: a gather of slots is then already batched by (kv head, sequence)
        shape = (a.num_kv_heads, num_slots, a.head_dim)
        return [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(a.num_layers)
        ]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        return freqs.cos().to(self.dtype)[:, None, :], freqs.sin().to(self.dtype)[:, None, :]

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # rotate-half ("neox") layout, as in Hugging Face checkpoints; GGUF Q/K are un-permuted at load
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttnGroup) -> torch.Tensor:
        """One query per sequence over its paged context: two batched matmuls per (kv head, sequence).

        Measured on the 2-core CPU (bf16, 9 query / 3 KV heads): torch's SDPA with one query row costs
        35 us at 64 keys but 870 us at 2,000, the two matmuls 37 us and 69 us; with a padding mask SDPA
        is slower still (it materialises and converts the mask on every call).
        """
        a = self.args
        kvh, hd, rep = a.num_kv_heads, a.head_dim, a.num_heads // a.num_kv_heads
        bd, lmax = q.shape[0], g.dec_len
        keys = k_cache.index_select(1, g.dec_slots).view(kvh * bd, lmax, hd)
        vals = v_cache.index_select(1, g.dec_slots).view(kvh * bd, lmax, hd)
        qq = q.view(bd, kvh, rep, hd).transpose(0, 1).reshape(kvh * bd, rep, hd)
        scores = torch.bmm(qq, keys.transpose(1, 2)).view(kvh, bd, rep, lmax).float()
        scores = scores.mul_(hd**-0.5)
        if bd > 1:  # a single row has no padding to mask
            scores = scores.add_(g.dec_bias)
        probs = scores.softmax(-1).to(q.dtype).view(kvh * bd, rep, lmax)
        return torch.bmm(probs, vals).view(kvh, bd, rep, hd).transpose(0, 1).reshape(bd, kvh * rep, hd)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        a = self.args
        h, kvh, hd = a.num_heads, a.num_kv_heads, a.head_dim
        t = batch.input_ids.shape[0]
        x = self.embed[batch.input_ids]
        cos, sin = self._rope(batch.positions)
        g = batch.attn
        for (attn_norm, qkv_proj, o_proj, ffn_norm, gate_up, down), (k_cache, v_cache) in zip(self.layers, kv):
            hs = rms_norm(x, attn_norm, a.rms_eps)
            qkv = qkv_proj(hs)
            # Q and K sit side by side in the fused projection: rotate them in one pass
            qk = self._apply_rope(qkv[:, : self.q_size + self.kv_size].view(t, h + kvh, hd), cos, sin)
            q, k = qk[:, :h], qk[:, h:]
            v = qkv[:, self.q_size + self.kv_size :].view(t, kvh, hd)
            k_cache.index_copy_(1, batch.slot_mapping, k.transpose(0, 1))
            v_cache.index_copy_(1, batch.slot_mapping, v.transpose(0, 1))
            out = torch.empty(t, h, hd, dtype=x.dtype, device=x.device)
            if g.dec_rows is not None:
                out.index_copy_(0, g.dec_rows, self._decode_attention(q.index_select(0, g.dec_rows), k_cache, v_cache, g))
            for start, n, slots, mask in g.prefills:
                qp = q[start : start + n].transpose(0, 1).unsqueeze(0)
                if slots is None:
                    kp = k[start : start + n].transpose(0, 1).unsqueeze(0)
                    vp = v[start : start + n].transpose(0, 1).unsqueeze(0)
                else:
                    kp = k_cache.index_select(1, slots).unsqueeze(0)
                    vp = v_cache.index_select(1, slots).unsqueeze(0)
                if mask is None:
                    op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
                else:
                    op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)
                out[start : start + n] = op[0].transpose(0, 1)
            x = x + o_proj(out.view(t, h * hd))
            hs = rms_norm(x, ffn_norm, a.rms_eps)
            gu = gate_up(hs)
            f = gu.shape[1] // 2
            x = x + down(F.silu(gu[:, :f]) * gu[:, f:])
        if batch.logits_rows.numel() == 0:
            return torch.empty(0, self.args.vocab_size, dtype=self.dtype)
        x = x.index_select(0, batch.logits_rows)
        x = rms_norm(x, self.norm, a.rms_eps)
        return self.lm_head(x)  # model dtype; the sampler upcasts only rows that need it
