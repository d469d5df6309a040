"""A roofline model of token production: prefill and decode step times, hence the throughput-interactivity Curve.

Decode step (one replica of `n` devices, batch `b`, mean context L):
    weights read = (dense params + expert params x fraction of experts touched by b tokens) x bytes/param
    KV read      = b x L x KV bytes per token
    t_mem        = (weights + KV) / (n x memory bandwidth x eff_mem)
    t_compute    = (2 x active params x b + attention FLOPs) / (n x peak FLOPS x eff_compute)
    t_comm       = tensor-parallel all-reduces over the scale-up link (n > 1) + per-layer latency
    t_step       = max(t_mem, t_compute) + t_comm + step_overhead_s
MoE models on n > 1 devices may instead run expert-parallel with data-parallel attention (dense
weights whole on every device, experts split n ways, an all-to-all dispatch and combine per layer);
a step takes whichever layout is faster.
Prefill per request: 2 x active params x ISL + causal attention FLOPs at eff_prefill.
Speculative decoding (MTP / draft tokens): each step verifies k draft tokens per sequence (compute for
1 + k tokens, weights and KV read once) and emits on average E = 1 + a + ... + a^k tokens, a the
acceptance rate; tok/s per user = E / step.
Aggregated serving interleaves prefill into decode: effective step = t_step + (b E / OSL) x t_prefill.
Disaggregated: decode runs pure steps; a prefill pool sized to keep up adds devices; TTFT adds the
KV transfer. SRAM decode (LPU-style): weights spread over enough chips' SRAM, decode bounded by
SRAM bandwidth, compute and a per-layer chip-to-chip hop; a GPU pool does prefill and attention.
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
    eff_mem: float = 0.70  # achieved / peak memory bandwidth in decode
    eff_compute: float = 0.45  # achieved / peak FLOPS in decode
    eff_prefill: float = 0.55  # achieved / peak FLOPS in prefill
    eff_comm: float = 0.60  # achieved / peak scale-up bandwidth
    step_overhead_s: float = 0.002  # fixed per decode step (launches, sampling, scheduling)
    layer_latency_s: float = 3e-6  # per layer per all-reduce or chip hop
    mem_headroom: float = 0.90  # usable fraction of device memory


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

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens a sequence emits per decode step: 1 + a + a^2 + ... + a^k."""
        return sum(self.spec_acceptance**i for i in range(self.spec_tokens + 1))

    @property
    def bpp(self) -> float:
        return BYTES_PER_PARAM[self.precision]

    @property
    def kv_bpp(self) -> float:
        if self.kv_precision:
            return BYTES_PER_PARAM[self.kv_precision]
        return 1.0 if self.bpp <= 1.0 else 2.0


class DoesNotFit(CatalogError):
    pass


def weight_bytes(m: Model, bpp: float) -> float:
    return m.total_params_b * 1e9 * bpp


def step_weight_bytes(m: Model, bpp: float, b: int) -> float:
    if not m.is_moe:
        return m.total_params_b * 1e9 * bpp
    dense = (m.total_params_b - m.expert_params_b) * 1e9
    touched = 1.0 - (1.0 - m.experts_active / m.experts) ** b  # fraction of experts any of b tokens uses
    return (dense + m.expert_params_b * 1e9 * touched) * bpp


def attention_flops(m: Model, tokens: int, context: float) -> float:
    return 4.0 * tokens * context * m.layers * m.heads * m.head_dim


def min_devices(s: Scenario, b: int, eff: Efficiency) -> int:
    need = weight_bytes(s.model, s.bpp) + b * (s.isl + s.osl) * s.model.kv_bytes_per_token(s.kv_bpp)
    return max(1, math.ceil(need / (s.hardware.memory_gb * 1e9 * eff.mem_headroom)))


def check_fit(s: Scenario, n: int, b: int, eff: Efficiency) -> None:
    h = s.hardware
    need = weight_bytes(s.model, s.bpp) + b * (s.isl + s.osl) * s.model.kv_bytes_per_token(s.kv_bpp)
    have = n * h.memory_gb * 1e9 * eff.mem_headroom
    if need > have:
        raise DoesNotFit(f"{s.model.name} at {s.precision} with {b} sequences of {s.isl + s.osl} tokens needs "
                         f"{need / 1e9:,.0f} GB but {n} x {h.name} offer {have / 1e9:,.0f} GB usable: "
                         f"{(need - have) / 1e9:,.0f} GB missing (use more devices, lower precision or fewer sequences)")


def decode_step_s(s: Scenario, n: int, b: int, eff: Efficiency, hw: Hardware | None = None) -> float:
    """Seconds per decode step of `b` sequences on `n` devices: the faster of the layouts that apply.

    Tensor parallel (any model): weights and KV split n ways, two all-reduces per layer.
    Expert parallel with data-parallel attention (MoE models, n > 1; how DeepSeek-R1 is served
    wide): each device keeps the dense weights (attention, shared experts) whole and runs attention
    for its b / n sequences; the experts are split n ways; each layer does an all-to-all dispatch
    (fp8, 1 byte an element) and combine (bf16, 2 bytes) of every token's hidden state to its
    `experts_active` experts, each collective also paying `layer_latency_s`.
    """
    h = hw or s.hardware
    m = s.model
    ctx = s.isl + s.osl / 2
    tok = b * (1 + s.spec_tokens)  # tokens computed this step (drafts are verified alongside)
    bw = h.mem_bw_tb_s * 1e12 * eff.eff_mem
    link = h.scaleup_bw_gb_s * 1e9 * eff.eff_comm
    kv_bytes = b * ctx * m.kv_bytes_per_token(s.kv_bpp)
    t_mem = (step_weight_bytes(m, s.bpp, tok) + kv_bytes) / (n * bw)
    flops = 2.0 * m.active_params_b * 1e9 * tok + attention_flops(m, tok, ctx)
    t_comp = flops / (n * h.peak_tflops(s.precision) * 1e12 * eff.eff_compute)
    t_comm = 0.0
    if n > 1:
        ar_bytes = 2 * m.layers * tok * m.hidden * 2 * 2 * (n - 1) / n  # two all-reduces per layer, bf16
        t_comm = ar_bytes / link + 2 * m.layers * eff.layer_latency_s
    t_tp = max(t_mem, t_comp) + t_comm
    if not (m.is_moe and n > 1):
        return t_tp + eff.step_overhead_s
    dense_bytes = (m.total_params_b - m.expert_params_b) * 1e9 * s.bpp
    expert_bytes = step_weight_bytes(m, s.bpp, tok) - dense_bytes
    t_mem_ep = dense_bytes / bw + (expert_bytes + kv_bytes) / (n * bw)
    a2a_bytes = tok / n * m.layers * m.experts_active * m.hidden * 3 * (n - 1) / n
    t_ep = max(t_mem_ep, t_comp) + a2a_bytes / link + 2 * m.layers * eff.layer_latency_s
    return min(t_tp, t_ep) + eff.step_overhead_s


def prefill_s(s: Scenario, n: int, eff: Efficiency, hw: Hardware | None = None) -> float:
    h = hw or s.hardware
    m = s.model
    flops = 2.0 * m.active_params_b * 1e9 * s.isl + attention_flops(m, s.isl, s.isl / 2)
    return flops / (n * h.peak_tflops(s.precision) * 1e12 * eff.eff_prefill) + weight_bytes(m, s.bpp) / (
        n * h.mem_bw_tb_s * 1e12 * eff.eff_mem)


def point(s: Scenario, n: int, b: int, eff: Efficiency = Efficiency()) -> OperatingPoint:
    """One operating point: `n` devices per replica (decode pool), `b` concurrent sequences per replica."""
    h, m = s.hardware, s.model
    if n > h.scaleup_domain and s.mode != "sram-decode":
        raise CatalogError(f"{n} devices exceed {h.name}'s scale-up domain of {h.scaleup_domain}")
    if s.mode == "sram-decode":
        return _sram_point(s, n, b, eff)
    check_fit(s, n, b, eff)
    t_step = decode_step_s(s, n, b, eff)
    t_pre = prefill_s(s, n, eff)
    kw = h.kw_all_in
    e = s.tokens_per_step
    if s.mode == "aggregated":
        step = t_step + (b * e / s.osl) * t_pre
        devices = n
        ttft = t_pre + t_step
    elif s.mode == "disaggregated":
        ph = s.prefill_hardware or h
        np_ = min_devices(replace(s, hardware=ph), 1, eff)
        t_pre = prefill_s(s, np_, eff, ph)
        step = t_step
        req_rate = b * e / (s.osl * t_step)  # requests/s one decode replica finishes
        prefill_devices = np_ * req_rate * t_pre  # devices busy prefilling to keep up
        devices = n + prefill_devices
        kv_bytes = s.isl * m.kv_bytes_per_token(s.kv_bpp)
        ttft = t_pre + kv_bytes / (min(h.scaleup_bw_gb_s, ph.scaleup_bw_gb_s) * 1e9 * eff.eff_comm)
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
    chips = math.ceil(weight_bytes(m, s.bpp) / (lpu.memory_gb * 1e9 * eff.mem_headroom))
    ctx = s.isl + s.osl / 2
    tok, e = b * (1 + s.spec_tokens), s.tokens_per_step
    t_w = step_weight_bytes(m, s.bpp, tok) / (chips * lpu.mem_bw_tb_s * 1e12 * eff.eff_mem)
    t_c = 2.0 * m.active_params_b * 1e9 * tok / (chips * lpu.peak_tflops(s.precision) * 1e12 * eff.eff_compute)
    t_hops = m.layers * eff.layer_latency_s  # the token crosses chip boundaries layer by layer
    kv_bytes = b * ctx * m.kv_bytes_per_token(s.kv_bpp)
    gs = replace(s, hardware=gpu)
    check_fit(replace(gs, model=replace(m, total_params_b=0.0)), n_gpu, b, eff)  # the GPUs hold only KV
    t_attn = kv_bytes / (n_gpu * gpu.mem_bw_tb_s * 1e12 * eff.eff_mem) + attention_flops(m, tok, ctx) / (
        n_gpu * gpu.peak_tflops(s.precision) * 1e12 * eff.eff_compute)
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
    """Every fitting (parallelism, concurrency) point; `Curve.frontier()` gives the Pareto set."""
    cs = concurrencies or [2**i for i in range(0, 13)]
    dom = s.prefill_hardware.scaleup_domain if s.mode == "sram-decode" and s.prefill_hardware else \
        s.hardware.scaleup_domain
    ps = parallelisms or [p for p in (1, 2, 4, 8, 16, 32, 64, 72) if p <= dom]
    pts = []
    last_error: CatalogError | None = None
    for n in ps:
        for b in cs:
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
