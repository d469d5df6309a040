"""A roofline model of token production: prefill and decode step times, hence the throughput-interactivity Curve.

Decode step (one replica of `n` devices, `b` sequences, mean context L, `p` prompt tokens riding along):
    weights read = dense params + expert params x fraction of experts the step's tokens touch (MoE),
                   x bytes/param; a prompt chunk adds the experts the decode tokens did not touch.
                   Bytes as checkpoints store them: routed experts at the stated precision, a MoE
                   model's other weights at `Model.fp4_dense_precision` when that is wider, the LM
                   head at 16 bits; the input embedding is gathered row by row, not read.
    t_matmul     = max(weights / (n x bandwidth x eff_mem),
                       2 x active params x (b / eff_compute + p / eff_prefill) / (n x peak FLOPS))
    t_attention  = max(b x attended(L) x KV bytes / (n x bandwidth x eff_mem),
                       decode attention FLOPs / (n x bf16 peak x eff_attention))
                   + the prompt chunk's own attention FLOPs at eff_prefill
    t_comm       = all-reduces over the scale-up link (n > 1) + 2 x layers x layer_latency_s
                   (expert parallel: an all-to-all dispatch and combine per layer, each paying a2a_latency_s)
    t_token      = (b + p) x layers x hidden x (token_cost_s + moe_token_cost_s if MoE) x (8 TB/s / bandwidth)
                   / n: each token's work outside the weight matmuls and attention (a MoE model's routing
                   and expert permutation on top), whatever the weights' precision
    t_step       = t_matmul + t_attention + t_comm + t_token + step_overhead_s
Each kind of kernel is bound by its own resource and they run one after another, so the step sums a
roofline per kind rather than taking one max over the whole step. attended(L) stops at the window on
sliding-window layers; absorbed MLA (DeepSeek) attends over the 576-wide latent.
MoE models on n > 1 devices may instead run expert-parallel with data-parallel attention (dense
weights whole on every device, experts split n ways, an all-to-all dispatch and combine per layer);
a step takes whichever layout is faster.
Speculative decoding (MTP / draft tokens): each step verifies k draft tokens per sequence (compute for
1 + k tokens, weights and KV read once) and emits on average E = 1 + a + ... + a^k tokens, a the
acceptance rate; tok/s per user = E / step.
Aggregated serving (chunked prefill): in steady state b x E / OSL prompts start per step, so p = b x E x
ISL / OSL prompt tokens share each step's weight read. TTFT = one prompt's prefill pass + a step.
Disaggregated: decode runs pure steps; a prefill pool sized to keep up adds devices, its passes
batching prompts up to `prefill_chunk_tokens`; TTFT adds the KV transfer. SRAM decode (LPU-style):
weights spread over enough chips' SRAM, decode bounded by SRAM bandwidth, compute and a per-layer
chip-to-chip hop; a GPU pool does prefill and attention.
Capacity: a replica holds its weights and b full-length sequences' KV cache (sliding-window layers
only their window) within the engine's budget: a fraction of each device (vLLM, SGLang) or the weights
plus a fraction of what they leave free (TensorRT-LLM, `Scenario.kv_free_fraction`). A sweep runs each
parallelism up to the largest batch that fits (`max_batch`).
Every efficiency is a named parameter (`Efficiency`) with a default; `calibrate` fits them.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, replace

from tokenfab.curve import Curve, OperatingPoint, Provenance
from tokenfab.perf.catalog import BYTES_PER_PARAM, CatalogError, Hardware, Model


@dataclass(frozen=True)
class Efficiency:
    """Named efficiencies. The seven fitted ones (`calibrate.FIT`) default to a fit on all 63 scored
    anchors.csv rows (`tokenfab calibrate`, 2026-12-01, tenth session; accuracy by
    `benchmarks/perf_accuracy.py` in docs/performance.md): public measurements of B200, GB200, H200 and
    H100 serving (InferenceX, vendor posts, AIConfigurator) and TensorRT-LLM's perf overview (offline
    maximum throughput), so they describe tuned stacks on those parts, averaged over stacks and dates
    that differ: calibrate to your own stack where you can.
    eff_compute and eff_attention trade off on these rows (both charge decode tokens' FLOPs; only
    DeepSeek-R1's MLA attention is compute-bound here), so one half of the rows fits 0.35 / 0.53 and all
    of them 0.68 / 0.30 for about the same errors; FlashMLA's own measurement (660 of H800's 989 bf16
    TFLOPS, 0.67) bounds what a tuned MLA decode kernel reaches. token_cost_s and moe_token_cost_s
    stand for how real kernels fall short of the roofline per token; TensorRT-LLM's offline runs want
    the cost almost all on MoE layers, the serving benchmarks on every layer (docs/performance.md,
    tenth session). step_overhead_s is not fitted (see `calibrate.FIT`); 0.4 ms is what an earlier
    five-parameter fit on all rows gave, and held-out errors moved little anywhere in 0.1-1 ms."""

    eff_mem: float = 0.460  # achieved / peak memory bandwidth in decode
    eff_compute: float = 0.678  # achieved / peak FLOPS for decode tokens' weight matmuls (see above)
    # achieved / `Scenario.attn_precision` peak FLOPS of decode attention where it is compute-bound rather than
    # bound by reading the cache (MLA's 128 query heads share one latent: about 480 FLOPs per cached byte at fp8)
    eff_attention: float = 0.295
    eff_prefill: float = 0.777  # achieved / peak FLOPS for prompt tokens
    eff_comm: float = 0.60  # achieved / peak scale-up bandwidth (not fitted)
    step_overhead_s: float = 0.0004  # fixed per decode step (launches, sampling, scheduling); not fitted
    layer_latency_s: float = 24.5e-6  # per layer per tensor-parallel all-reduce, or per chip hop (SRAM decode)
    # per layer per expert-parallel all-to-all (dispatch or combine); not fitted, but taken from a measurement:
    # TensorRT-LLM's NVLink one-sided all-to-all on GB200 NVL72 (DeepSeek-V3 shapes, EP 8-64, 1-16 tokens per rank)
    # takes 18-29 us to dispatch and 31-35 us to combine (its tech blog 18), about 50 us the pair; more tokens add
    # their bytes over the link
    a2a_latency_s: float = 25e-6
    # seconds per token (decode or prompt) per layer per unit of hidden width on a device with 8 TB/s of memory
    # bandwidth (B200, GB200), scaled by bandwidth on others: what a token costs outside the weight matmuls and
    # attention as the roofline counts them (norms, activation quantization, rotary embedding, residuals, matmul
    # tiles a small batch leaves idle), whatever the weights' precision. Fitted; more than those kernels' bytes
    # alone, so it stands for how real kernels fall short
    token_cost_s: float = 2.40e-11
    # what a token of a MoE model costs on top of that, per layer per unit of hidden width, scaled the same way:
    # routing (router matmul, top-k), permuting its hidden state to its experts and back (gather, scatter,
    # weighted combine) and grouped-GEMM tiles that small, uneven per-expert batches leave idle. Dense models pay
    # none. Fitted: on TensorRT-LLM's rows it is nearly all of the per-token cost (docs/performance.md)
    moe_token_cost_s: float = 7.25e-11
    mem_headroom: float = 0.90  # usable fraction of device memory (not fitted)


@dataclass(frozen=True)
class Scenario:
    model: Model
    hardware: Hardware
    precision: str = "fp8"
    isl: int = 1024
    osl: int = 1024
    kv_precision: str | None = None  # default: fp8 if the weights are <= 8 bit, else bf16
    mode: str = "aggregated"  # aggregated | disaggregated | sram-decode
    prefill_hardware: Hardware | None = None  # sram-decode / disaggregated: the GPU pool (default: same)
    spec_tokens: int = 0  # draft tokens verified per decode step (MTP); 0 = no speculative decoding
    spec_acceptance: float = 0.85  # chance each draft token is accepted (DeepSeek-V3 report: 85-90% for MTP)
    attn_precision: str = "bf16"  # precision decode/prefill attention computes in
    # prompt tokens one forward pass takes (vLLM max_num_batched_tokens / SGLang chunked_prefill_size,
    # commonly 8192 on large GPUs): aggregated chunks and disaggregated prefill batches share a weight read
    prefill_chunk_tokens: int = 8192
    max_concurrency: int = 0  # sequences one replica is run with at most (engine or benchmark limit; 0 = none)
    # the decode parallelism a source ran, where it says: devices per replica (0 = sweep them) and layout
    # ("tp": tensor parallel; "ep": expert parallel with data-parallel attention; "" = whichever is faster)
    devices: int = 0
    layout: str = ""
    # how the engine sizes its KV cache: 0 = weights and KV share `Efficiency.mem_headroom` of each device
    # (vLLM's gpu_memory_utilization, SGLang's mem_fraction_static: fractions of the whole device); > 0 =
    # the KV cache gets this fraction of the memory the weights leave free (TensorRT-LLM's
    # kv_cache_free_gpu_mem_fraction, 0.9 by default)
    kv_free_fraction: float = 0.0

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens a sequence emits per decode step: 1 + a + a^2 + ... + a^k."""
        return sum(self.spec_acceptance**i for i in range(self.spec_tokens + 1))

    @property
    def bpp(self) -> float:
        return BYTES_PER_PARAM[self.precision]

    @property
    def dense_bpp(self) -> float:
        """Bytes per parameter of the weights outside the routed experts (see Model.fp4_dense_precision)."""
        return BYTES_PER_PARAM[self.model.dense_precision(self.precision)]

    @property
    def kv_bpp(self) -> float:
        if self.kv_precision:
            return BYTES_PER_PARAM[self.kv_precision]
        return 1.0 if self.bpp <= 1.0 else 2.0


class DoesNotFit(CatalogError):
    pass


def _non_expert_bytes(m: Model, bpp: float, dense_bpp: float | None, table_params_b: float) -> float:
    """The layers' weights outside the routed experts at `dense_bpp` (default `bpp`), plus
    `table_params_b` of embedding / LM-head table, which quantized checkpoints keep at 16 bits."""
    db = bpp if dense_bpp is None else dense_bpp
    return ((m.dense_params_b - m.table_params_b) * db + table_params_b * max(db, BYTES_PER_PARAM["bf16"])) * 1e9


def weight_bytes(m: Model, bpp: float, dense_bpp: float | None = None) -> float:
    """All the weights held: routed experts at `bpp`, the other layers' weights at `dense_bpp` (default
    `bpp`), the embedding and LM-head tables at 16 bits."""
    return _non_expert_bytes(m, bpp, dense_bpp, m.table_params_b) + m.expert_params_b * 1e9 * bpp


def step_weight_bytes(m: Model, bpp: float, b: float, dense_bpp: float | None = None) -> float:
    """Weight bytes a forward pass over `b` tokens reads: the layers' dense weights (at `dense_bpp`,
    default `bpp`) and the LM head (16-bit; of the input embedding only the tokens' rows are gathered),
    plus, for a MoE model, the experts any of the tokens is routed to (routing taken as uniform)."""
    dense = _non_expert_bytes(m, bpp, dense_bpp, m.embedding_params_b)
    if not m.is_moe:
        return dense
    touched = 1.0 - (1.0 - m.experts_active / m.experts) ** b  # fraction of experts any of b tokens uses
    return dense + m.expert_params_b * 1e9 * touched * bpp


def matmul_s_per_token(s: Scenario, h: Hardware) -> float:
    """Seconds one token's weight matmuls take at `h`'s peak: the routed experts at the scenario's
    precision (or the wider one their activations run at, Model.fp4_compute_precision), the layers' other
    weights at theirs (Model.fp4_dense_precision), the LM head at 16 bits (the input embedding is a
    lookup, not a matmul)."""
    m = s.model
    dense_prec = m.dense_precision(s.precision)
    head_prec = "bf16" if BYTES_PER_PARAM[dense_prec] < BYTES_PER_PARAM["bf16"] else dense_prec

    def peak(prec: str) -> float:  # a part that lists no wider format (an LPU) runs it at the stated one
        try:
            return h.peak_tflops(prec)
        except CatalogError:
            return h.peak_tflops(s.precision)

    layers = m.active_params_b - m.active_expert_params_b - m.table_params_b
    return 2.0 * 1e9 * (layers / peak(dense_prec) + m.embedding_params_b / peak(head_prec) +
                        m.active_expert_params_b / peak(m.expert_compute_precision(s.precision))) / 1e12


def attention_flops(m: Model, tokens: float, context: float) -> float:
    """Prefill attention FLOPs (q.k and p.v over head_dim) for `tokens` tokens at mean `context`."""
    return 4.0 * tokens * m.attended(context) * m.heads * m.head_dim


TOKEN_COST_REF_BW_TB_S = 8.0  # the memory bandwidth `Efficiency.token_cost_s` is stated at


def token_s(m: Model, h: Hardware, eff: Efficiency) -> float:
    """Seconds of work one token costs on `h` outside the weight matmuls and attention (`token_cost_s`, plus
    `moe_token_cost_s` for a MoE model), scaled from 8 TB/s to `h`'s memory bandwidth: the work is mostly
    small, memory-bound kernels."""
    per = eff.token_cost_s + (eff.moe_token_cost_s if m.is_moe else 0.0)
    return m.layers * m.hidden * per * TOKEN_COST_REF_BW_TB_S / h.mem_bw_tb_s


def allreduce_bytes(m: Model, tokens: float, n: int) -> float:
    """Bytes one device moves for a tensor-parallel pass over `tokens` tokens: two bf16 all-reduces of
    the hidden state per layer, each sending 2 (n - 1) / n of it (ring)."""
    return 2 * m.layers * tokens * m.hidden * 2 * 2 * (n - 1) / n


def bytes_needed(s: Scenario, b: int, weights: bool = True) -> float:
    """Memory `b` full-length sequences need: their KV cache, plus all the weights unless `weights` is
    False (a pool that holds only KV, as the GPUs behind an SRAM decoder do)."""
    kv = b * s.model.kv_bytes_held(s.isl + s.osl, s.kv_bpp)
    return kv + (weight_bytes(s.model, s.bpp, s.dense_bpp) if weights else 0.0)


def usable_bytes(s: Scenario, n: int, layout: str, eff: Efficiency, hw: Hardware | None = None,
                 weights: bool = True) -> float:
    """Bytes each of `n` devices may fill with weights and KV cache in `layout`, by the engine's budget
    (`Scenario.kv_free_fraction`): a fraction of the whole device, or the weights plus a fraction of
    what they leave free. With `weights` False the devices hold KV only."""
    total = (hw or s.hardware).memory_gb * 1e9
    if not s.kv_free_fraction:
        return total * eff.mem_headroom
    held = layout_bytes(s, n, 0, layout) if weights else 0.0
    return held + s.kv_free_fraction * max(0.0, total - held)


def min_devices(s: Scenario, b: int, eff: Efficiency) -> int:
    return max(1, math.ceil(bytes_needed(s, b) / (s.hardware.memory_gb * 1e9 * eff.mem_headroom)))


def check_fit(s: Scenario, n: int, b: int, eff: Efficiency, weights: bool = True) -> None:
    """Raise DoesNotFit unless `b` full-length sequences fit on `n` devices in some layout the scenario
    allows (`layouts`, `layout_bytes`); with `weights` False, their KV cache alone (spread n ways)."""
    h = s.hardware
    if weights:  # the layout that comes closest to fitting
        need, have = min(((n * layout_bytes(s, n, b, k), n * usable_bytes(s, n, k, eff)) for k in layouts(s, n)),
                         key=lambda nh: nh[0] - nh[1])
    else:
        need, have = bytes_needed(s, b, weights), n * usable_bytes(s, n, "tp", eff, weights=False)
    if need > have:
        raise DoesNotFit(f"{s.model.name} at {s.precision} with {b} sequences of {s.isl + s.osl} tokens needs "
                         f"{need / 1e9:,.0f} GB but {n} x {h.name} offer {have / 1e9:,.0f} GB usable: "
                         f"{(need - have) / 1e9:,.0f} GB missing (use more devices, lower precision or fewer sequences)")


def max_batch(s: Scenario, n: int, eff: Efficiency, weights: bool = True) -> int:
    """The most full-length sequences `n` devices hold in some layout the scenario allows (what
    `check_fit` accepts; 0 if not even one fits): an engine runs as many as its KV cache holds, so a
    capacity-bound frontier ends there, not at the power of two below it. With `weights` False, the
    devices hold KV only (the GPU pool behind an SRAM decoder)."""
    per_seq = s.model.kv_bytes_held(s.isl + s.osl, s.kv_bpp)
    if not weights:
        return max(0, math.floor(n * usable_bytes(s, n, "tp", eff, weights=False) / per_seq))
    best = 0
    for k in layouts(s, n):  # bytes per device are linear in b: a fixed part plus a per-sequence part
        usable = usable_bytes(s, n, k, eff)
        fixed = layout_bytes(s, n, 0, k)
        per = layout_bytes(s, n, 1, k) - fixed
        b = math.floor((usable - fixed) / per) if per > 0 else 0
        while b > 0 and layout_bytes(s, n, b, k) > usable:  # guard the floor against rounding
            b -= 1
        best = max(best, b)
    return best


def layouts(s: Scenario, n: int) -> tuple[str, ...]:
    """The decode layouts open to `s` on `n` devices: expert parallel only for a MoE model on several."""
    both = ("tp", "ep") if s.model.is_moe and n > 1 else ("tp",)
    return (s.layout,) if s.layout in both else both


def kv_share(m: Model, n: int) -> int:
    """Ways tensor parallelism over `n` devices splits the KV cache: by KV head, so ranks beyond the
    model's KV heads hold copies (an MLA model's one latent "head" is copied to every rank)."""
    return min(n, m.kv_heads) if m.kv_heads else n


def layout_bytes(s: Scenario, n: int, b: int, layout: str) -> float:
    """Bytes each of `n` devices holds for `b` full-length sequences in `layout`: tensor parallel splits
    the weights n ways and the KV cache `kv_share` ways; expert parallel with data-parallel attention keeps
    the weights outside the routed experts whole on every device, splits the experts and the sequences."""
    m = s.model
    kv = b * m.kv_bytes_held(s.isl + s.osl, s.kv_bpp)
    if layout == "ep":
        experts = m.expert_params_b * 1e9 * s.bpp
        return _non_expert_bytes(m, s.bpp, s.dense_bpp, m.table_params_b) + experts / n + kv / n
    return weight_bytes(m, s.bpp, s.dense_bpp) / n + kv / kv_share(m, n)


def decode_step_s(s: Scenario, n: int, b: int, eff: Efficiency, hw: Hardware | None = None,
                  prefill_tokens: float = 0.0) -> float:
    """Seconds per decode step of `b` sequences on `n` devices: the faster of the layouts that apply.

    `prefill_tokens` are prompt tokens computed in the same forward pass (aggregated serving with
    chunked prefill): they add compute (at `eff_prefill`) and collective traffic, and a chunk reads the
    weights the decode tokens did not touch (a MoE model's other experts), once per chunk of
    `min(isl, prefill_chunk_tokens)` tokens; the weights the step reads anyway are not read twice.
    Decode attention runs at the `attn_precision` peak (the serving stacks' decode attention kernels
    compute in bf16 over an fp8 cache); sliding-window layers read only their window.

    Tensor parallel (any model): weights split n ways, two all-reduces per layer; attention splits by
    head, so each device reads its share of the KV cache, all of it for an MLA model (`kv_share`).
    Expert parallel with data-parallel attention (MoE models, n > 1; how DeepSeek-R1 is served
    wide): each device keeps the dense weights (attention, shared experts) whole and runs attention
    for its b / n sequences; the experts are split n ways; each layer does an all-to-all dispatch
    (fp8, 1 byte an element) and combine (bf16, 2 bytes) of every token's hidden state to its
    `experts_active` experts, each collective also paying `a2a_latency_s`.
    A layout whose per-device bytes (`layout_bytes`) overflow the device is not taken; `s.layout`
    restricts the choice to one layout.
    """
    h = hw or s.hardware
    m = s.model
    ctx = s.isl + s.osl / 2
    tok = b * (1 + s.spec_tokens)  # tokens computed this step (drafts are verified alongside)
    moved = tok + prefill_tokens  # tokens whose hidden states cross the collectives
    bw = h.mem_bw_tb_s * 1e12 * eff.eff_mem
    link = h.scaleup_bw_gb_s * 1e9 * eff.eff_comm
    kv_bytes = b * m.kv_bytes_held(ctx, s.kv_bpp)  # each decode token reads its cache
    w_dec = step_weight_bytes(m, s.bpp, tok, s.dense_bpp)
    w_pre = 0.0
    if prefill_tokens > 0:
        chunk = min(s.isl, s.prefill_chunk_tokens)
        w_pre = min(1.0, prefill_tokens / chunk) * (step_weight_bytes(m, s.bpp, tok + chunk, s.dense_bpp) - w_dec)
    attn_peak = h.peak_tflops(s.attn_precision) * 1e12
    # each kind of kernel is bound by its own resource and they run one after another, so the step sums
    # a roofline per kind: the weight matmuls (weights read once for decode and prefill tokens together)
    # and attention (decode over each sequence's cache; a prefill chunk's own attention)
    lin_flops_s = matmul_s_per_token(s, h) * (tok / eff.eff_compute + prefill_tokens / eff.eff_prefill)
    attn_flops_s = m.decode_attention_flops(tok, ctx) / (attn_peak * eff.eff_attention)
    pre_attn_s = attention_flops(m, prefill_tokens, s.isl / 2) / (attn_peak * eff.eff_prefill)
    t_lin = max((w_dec + w_pre) / bw, lin_flops_s)
    t_token = token_s(m, h, eff) * (tok + prefill_tokens) / n  # tokens spread over n devices either way
    # the layouts open to this step, less those whose bytes overflow a device (unless none fits: the time
    # of a step is still defined, and `check_fit` is what refuses a configuration)
    open_ = layouts(s, n)
    open_ = tuple(k for k in open_ if layout_bytes(s, n, b, k) <= usable_bytes(s, n, k, eff, h)) or open_
    times = {}
    if "tp" in open_:
        t_comm = 0.0
        if n > 1:
            t_comm = allreduce_bytes(m, moved, n) / link + 2 * m.layers * eff.layer_latency_s
        t_attn = max(kv_bytes / (kv_share(m, n) * bw), attn_flops_s / n) + pre_attn_s / n
        times["tp"] = t_lin / n + t_attn + t_comm + t_token
    if "ep" in open_:
        dense_bytes = step_weight_bytes(m, s.bpp, 0, s.dense_bpp)  # what every device reads whole
        t_lin_ep = max(dense_bytes / bw + (w_dec + w_pre - dense_bytes) / (n * bw), lin_flops_s / n)
        t_attn = (max(kv_bytes / bw, attn_flops_s) + pre_attn_s) / n
        a2a_bytes = moved / n * m.layers * m.experts_active * m.hidden * 3 * (n - 1) / n
        times["ep"] = t_lin_ep + t_attn + a2a_bytes / link + 2 * m.layers * eff.a2a_latency_s + t_token
    return min(times.values()) + eff.step_overhead_s


def prefill_pass(s: Scenario, n: int, eff: Efficiency, hw: Hardware | None = None) -> tuple[float, int]:
    """A dedicated prefill forward pass on `n` devices: (seconds, prompts in it). A pass batches as many
    whole prompts as fit in `prefill_chunk_tokens` (at least one), so its weight read is shared."""
    h = hw or s.hardware
    m = s.model
    prompts = max(1, s.prefill_chunk_tokens // s.isl)
    tokens = prompts * s.isl
    t_comp = (matmul_s_per_token(s, h) * tokens + attention_flops(m, tokens, s.isl / 2) / (
        h.peak_tflops(s.attn_precision) * 1e12)) / (n * eff.eff_prefill)
    t_mem = step_weight_bytes(m, s.bpp, tokens, s.dense_bpp) / (n * h.mem_bw_tb_s * 1e12 * eff.eff_mem)
    t_comm = 0.0
    if n > 1:
        t_comm = allreduce_bytes(m, tokens, n) / (h.scaleup_bw_gb_s * 1e9 * eff.eff_comm)
    return max(t_comp, t_mem) + t_comm + token_s(m, h, eff) * tokens / n, prompts


def prefill_s(s: Scenario, n: int, eff: Efficiency, hw: Hardware | None = None) -> float:
    """Seconds of a prefill pass per prompt in it (the device time one request's prefill costs)."""
    t, prompts = prefill_pass(s, n, eff, hw)
    return t / prompts


def point(s: Scenario, n: int, b: int, eff: Efficiency = Efficiency()) -> OperatingPoint:
    """One operating point: `n` devices per replica (decode pool), `b` concurrent sequences per replica."""
    h, m = s.hardware, s.model
    if n > h.scaleup_domain and s.mode != "sram-decode":
        raise CatalogError(f"{n} devices exceed {h.name}'s scale-up domain of {h.scaleup_domain}")
    if s.mode == "sram-decode":
        return _sram_point(s, n, b, eff)
    check_fit(s, n, b, eff)
    kw = h.kw_all_in
    e = s.tokens_per_step
    if s.mode == "aggregated":
        # steady state: b x e / osl prompts finish (and start) per step, their prompt tokens ride along
        t_step = decode_step_s(s, n, b, eff, prefill_tokens=b * e * s.isl / s.osl)
        t_pre, _ = prefill_pass(replace(s, prefill_chunk_tokens=s.isl), n, eff)  # a prompt on its own
        step = t_step
        devices = n
        ttft = t_pre + t_step
    elif s.mode == "disaggregated":
        t_step = decode_step_s(s, n, b, eff)
        ph = s.prefill_hardware or h
        np_ = min_devices(replace(s, hardware=ph), 1, eff)
        t_pass, prompts = prefill_pass(s, np_, eff, ph)
        t_pre = t_pass / prompts
        step = t_step
        req_rate = b * e / (s.osl * t_step)  # requests/s one decode replica finishes
        prefill_devices = np_ * req_rate * t_pre  # devices busy prefilling to keep up
        devices = n + prefill_devices
        kv_bytes = m.kv_bytes_held(s.isl, s.kv_bpp)
        ttft = t_pass + kv_bytes / (min(h.scaleup_bw_gb_s, ph.scaleup_bw_gb_s) * 1e9 * eff.eff_comm)
        kw = (n * h.kw_all_in + prefill_devices * ph.kw_all_in) / devices
    else:
        raise CatalogError(f"mode {s.mode!r}: aggregated, disaggregated or sram-decode")
    tok_s_user = e / step
    tok_s_device = b * e / step / devices
    return OperatingPoint(
        concurrency=b, tok_s_user=tok_s_user, tok_s_device=tok_s_device, ttft_ms=ttft * 1000,
        watts=kw * 1000, j_per_token=kw * 1000 / tok_s_device,
        extra={"devices_per_replica": devices, "decode_devices": n, "step_ms": t_step * 1000,
               "prefill_ms": t_pre * 1000, "kw_per_device": kw, "tok_s_per_mw": tok_s_device * 1000 / kw,
               "usd_per_mtok": _usd_per_mtok(s, n, devices, tok_s_device)},
    )


def _usd_per_mtok(s: Scenario, n: int, devices: float, tok_s_device: float) -> float:
    h = s.hardware
    ph = s.prefill_hardware or h
    usd_h = (n * h.usd_per_device_hour + (devices - n) * ph.usd_per_device_hour) / devices
    return usd_h * 1e6 / (tok_s_device * 3600)


def _sram_point(s: Scenario, n_gpu: int, b: int, eff: Efficiency) -> OperatingPoint:
    """Weights in LPU SRAM (as many chips as they need), attention/KV and prefill on a GPU pool."""
    lpu, gpu, m = s.hardware, s.prefill_hardware, s.model
    if gpu is None:
        raise CatalogError("sram-decode needs a GPU pool for prefill and attention (prefill_hardware)")
    chips = math.ceil(weight_bytes(m, s.bpp, s.dense_bpp) / (lpu.memory_gb * 1e9 * eff.mem_headroom))
    ctx = s.isl + s.osl / 2
    tok, e = b * (1 + s.spec_tokens), s.tokens_per_step
    t_w = step_weight_bytes(m, s.bpp, tok, s.dense_bpp) / (chips * lpu.mem_bw_tb_s * 1e12 * eff.eff_mem)
    t_c = matmul_s_per_token(s, lpu) * tok / (chips * eff.eff_compute)
    t_hops = m.layers * eff.layer_latency_s  # the token crosses chip boundaries layer by layer
    kv_bytes = b * m.kv_bytes_held(ctx, s.kv_bpp)  # each decode token reads its cache
    gs = replace(s, hardware=gpu)
    check_fit(gs, n_gpu, b, eff, weights=False)  # the GPUs hold only KV
    t_attn = kv_bytes / (n_gpu * gpu.mem_bw_tb_s * 1e12 * eff.eff_mem) + m.decode_attention_flops(tok, ctx) / (
        n_gpu * gpu.peak_tflops(s.attn_precision) * 1e12 * eff.eff_attention)
    t_step = max(t_w, t_c) + t_attn + t_hops + eff.step_overhead_s
    t_pre = prefill_s(gs, n_gpu, eff)
    step = t_step + (b * e / s.osl) * t_pre
    devices = chips + n_gpu
    kw = (chips * lpu.kw_all_in + n_gpu * gpu.kw_all_in) / devices
    tok_s_device = b * e / step / devices
    usd_h = (chips * lpu.usd_per_device_hour + n_gpu * gpu.usd_per_device_hour) / devices
    return OperatingPoint(
        concurrency=b, tok_s_user=e / step, tok_s_device=tok_s_device, ttft_ms=(t_pre + t_step) * 1000,
        watts=kw * 1000, j_per_token=kw * 1000 / tok_s_device,
        extra={"devices_per_replica": devices, "lpu_chips": chips, "gpus": n_gpu, "step_ms": t_step * 1000,
               "kw_per_device": kw, "tok_s_per_mw": tok_s_device * 1000 / kw,
               "usd_per_mtok": usd_h * 1e6 / (tok_s_device * 3600)},
    )


def sweep(s: Scenario, eff: Efficiency = Efficiency(), concurrencies: list[int] | None = None,
          parallelisms: list[int] | None = None) -> Curve:
    """Every fitting (parallelism, concurrency) point; `Curve.frontier()` gives the Pareto set.

    Without `concurrencies`, each parallelism is swept over powers of two up to 4096 and also run at
    its `max_batch` and at the scenario's `max_concurrency` (the lower where both apply) when that falls
    inside the sweep: the throughput end of a capacity- or client-bound curve is the batch an engine
    actually runs, not the power of two below it."""
    base = concurrencies or [2**i for i in range(0, 13)]
    dom = s.prefill_hardware.scaleup_domain if s.mode == "sram-decode" and s.prefill_hardware else \
        s.hardware.scaleup_domain
    ps = parallelisms or ([s.devices] if s.devices else [p for p in (1, 2, 4, 8, 16, 32, 64, 72) if p <= dom])
    pts = []
    last_error: CatalogError | None = None
    for n in ps:
        cs = base
        if not concurrencies:
            if s.mode == "sram-decode":  # the GPU pool holds the KV cache, the chips the weights
                end = max_batch(replace(s, hardware=s.prefill_hardware), n, eff, weights=False) \
                    if s.prefill_hardware else 0
            else:
                end = max_batch(s, n, eff)
            if s.max_concurrency:
                end = min(end, s.max_concurrency)
            if 0 < end < max(base):  # within the sweep's range
                cs = sorted({*base, end})
        for b in cs:
            if s.max_concurrency and b > s.max_concurrency:
                continue
            try:
                pts.append(point(s, n, b, eff))
            except DoesNotFit as exc:
                last_error = exc
    if not pts:
        try:  # report the most favourable configuration's shortfall
            point(s, max(ps), 1, eff)
        except DoesNotFit as exc:
            raise exc from None
        raise last_error or CatalogError("no operating point fits")
    return Curve(
        name=f"{s.model.name} {s.precision} on {s.hardware.name}" + (f" + {s.prefill_hardware.name}"
                                                                     if s.prefill_hardware else "") + f" ({s.mode})",
        points=tuple(pts),
        provenance=Provenance(
            kind="predicted", source="tokenfab.perf roofline", subject=f"{s.hardware.name} / {s.model.name} / "
            f"{s.precision} / {s.isl}:{s.osl} / {s.mode}",
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            details={"efficiency": asdict(eff), "hardware_sources": s.hardware.sources, "model_source": s.model.source},
        ),
    )
