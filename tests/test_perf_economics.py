"""The performance model and the economics, checked against hand-computed cases."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tokenfab.curve import Curve, OperatingPoint, Provenance
from tokenfab.economics.cost import request_cost_usd, usd_per_mtok_from_device_hour
from tokenfab.economics.planner import HardwareOption, PlanError, TierDemand, plan_factory
from tokenfab.economics.tiers import SLO, Tier, TierError, TierTable, default_tiers
from tokenfab.perf.calibrate import FIT, calibrate, errors, load_anchors, predict, predictable
from tokenfab.perf.catalog import Catalog, CatalogError
from tokenfab.perf.model import DoesNotFit, Efficiency, Scenario, check_fit, decode_step_s, point, sweep

CAT = Catalog.default()
MM_8B = 8.03e9 - 128256 * 4096  # Llama-3.1-8B's weights a token multiplies: all but the input embedding
IDEAL = Efficiency(eff_mem=1.0, eff_compute=1.0, eff_prefill=1.0, eff_comm=1.0, step_overhead_s=0.0,
                   layer_latency_s=0.0, a2a_latency_s=0.0, token_cost_s=0.0, moe_token_cost_s=0.0,
                   eff_attention=1.0)


def test_decode_step_of_a_dense_model_is_bytes_over_bandwidth():
    m, h = CAT.model("Llama-3.1-8B"), CAT.hw("H100")
    s = Scenario(m, h, "bf16", isl=1024, osl=1024)
    weights = MM_8B * 2  # all but the input embedding, whose rows are only gathered
    kv = 1 * (1024 + 512) * 32 * 2048 * 2  # one sequence, mean context, bf16 KV
    expected = (weights + kv) / 3.35e12
    assert decode_step_s(s, 1, 1, IDEAL) == pytest.approx(expected, rel=1e-9)
    assert expected * 1000 == pytest.approx(4.540, abs=0.01)
    # at a large batch the matmuls become compute-bound; each kind of kernel has its own roofline
    matmul = max(weights / 3.35e12, 2 * MM_8B * 512 / 989e12)
    attention = max(512 * kv / 3.35e12, 4 * 512 * 1536 * 32 * 32 * 128 / 989e12)
    assert matmul == 2 * MM_8B * 512 / 989e12  # compute-bound
    assert decode_step_s(s, 1, 512, IDEAL) == pytest.approx(matmul + attention)


def test_speculative_decoding_emits_accepted_tokens_per_step():
    """One MTP draft at 85% acceptance: 1.85 tokens per step; a memory-bound step costs the same,
    a compute-bound one computes twice the tokens."""
    m, h = CAT.model("Llama-3.1-8B"), CAT.hw("H100")
    plain = Scenario(m, h, "bf16", isl=1024, osl=1024, mode="disaggregated")
    mtp = Scenario(m, h, "bf16", isl=1024, osl=1024, mode="disaggregated", spec_tokens=1, spec_acceptance=0.85)
    assert mtp.tokens_per_step == pytest.approx(1.85)
    assert decode_step_s(mtp, 1, 1, IDEAL) == pytest.approx(decode_step_s(plain, 1, 1, IDEAL))
    assert point(mtp, 1, 1, IDEAL).tok_s_user == pytest.approx(1.85 * point(plain, 1, 1, IDEAL).tok_s_user)
    matmul_2x = max(MM_8B * 2 / 3.35e12, 2 * MM_8B * 1024 / 989e12)  # 1,024 tokens through the weights
    attention_2x = max(512 * 1536 * 32 * 2048 * 2 / 3.35e12, 4 * 1024 * 1536 * 32 * 32 * 128 / 989e12)
    assert decode_step_s(mtp, 1, 512, IDEAL) == pytest.approx(matmul_2x + attention_2x)


def test_prompt_tokens_share_the_decode_steps_weight_read():
    """Aggregated serving: a prompt chunk in the same step adds its FLOPs, not a second weight read."""
    m, h = CAT.model("Llama-3.1-8B"), CAT.hw("H100")
    s = Scenario(m, h, "bf16", isl=1024, osl=1024)
    kv = (1024 + 512) * 32 * 2048 * 2
    matmul = max(MM_8B * 2 / 3.35e12, 2 * MM_8B * (1 + 1024) / 989e12)
    attention = max(kv / 3.35e12, 4 * 1 * 1536 * 32 * 32 * 128 / 989e12) + 4 * 1024 * 512 * 32 * 32 * 128 / 989e12
    assert decode_step_s(s, 1, 1, IDEAL, prefill_tokens=1024) == pytest.approx(matmul + attention)
    # a MoE model's prompt chunk touches the experts one decode token does not: the step reads them all
    ds = Scenario(CAT.model("DeepSeek-R1"), CAT.hw("B200"), "fp8", 1024, 1024)
    alone, with_prompt = decode_step_s(ds, 8, 1, IDEAL), decode_step_s(ds, 8, 1, IDEAL, prefill_tokens=1024)
    dense = (671 - 654) * 1e9
    assert alone < (dense + 654e9 * 0.1) / (8 * 8e12) + 0.001  # about 3% of the experts
    assert with_prompt > 671e9 * 0.99 / (8 * 8e12)  # all of them


def test_quantized_checkpoints_keep_tables_and_moe_dense_weights_wider():
    """fp4 MoE checkpoints quantize the routed experts only; embedding and LM head stay 16-bit."""
    from tokenfab.perf.model import step_weight_bytes, weight_bytes

    ds = CAT.model("DeepSeek-R1")
    table = 129280 * 7168  # one vocab x hidden table
    s = Scenario(ds, CAT.hw("B200"), "fp4", 1024, 1024)
    assert s.dense_bpp == 1.0 and s.bpp == 0.5625  # nvidia/DeepSeek-R1-FP4: experts fp4, the rest fp8
    assert weight_bytes(ds, s.bpp, s.dense_bpp) == pytest.approx(
        (671 - 654) * 1e9 - 2 * table + 2 * table * 2 + 654e9 * 0.5625)
    # one token: the dense layers, the LM head (not the input embedding) and 8 of 256 experts' share
    one = step_weight_bytes(ds, s.bpp, 1, s.dense_bpp)
    assert one == pytest.approx((671 - 654) * 1e9 - 2 * table + table * 2 + 654e9 * 8 / 256 * 0.5625)
    llama = Scenario(CAT.model("Llama-3.1-70B"), CAT.hw("B200"), "fp4", 1024, 1024)
    assert llama.dense_bpp == 0.5625  # a dense model's fp4 checkpoint quantizes every layer
    smol = CAT.model("SmolLM2-135M")  # tied: the one table is the LM head and is read every step
    assert step_weight_bytes(smol, 2.0, 1) == pytest.approx(0.1345e9 * 2)


def test_attention_shapes_mla_and_sliding_window():
    ds = CAT.model("DeepSeek-R1")  # absorbed MLA: scores over 576 dims, values 512 wide, 128 heads
    assert ds.decode_attention_flops(1, 1000) == 2 * 1000 * 61 * 128 * (576 + 512)
    oss = CAT.model("gpt-oss-120b")  # 18 of 36 layers see a 128-token window
    assert oss.attended(8192) == 18 * 8192 + 18 * 128 and oss.attended(100) == 36 * 100
    assert CAT.model("Llama-3.1-70B").decode_attention_flops(2, 10) == 4 * 2 * 10 * 80 * 64 * 128


def test_sliding_window_layers_hold_only_their_window():
    """A windowed layer's cache stops at its window (TensorRT-LLM's per-window pools, vLLM's hybrid KV
    cache manager), so gpt-oss-120b at 1k/32k holds about half the KV a full-attention count gives, and
    fits about twice the sequences. fp8 KV: 1,024 elements (8 heads x 64 x K,V) a token a layer."""
    from tokenfab.perf.model import bytes_needed, layout_bytes, max_batch, weight_bytes

    oss = CAT.model("gpt-oss-120b")
    held = (18 * 33792 + 18 * 128) * 1024
    assert oss.kv_bytes_held(33792, 1.0) == held < 0.51 * 36 * 33792 * 1024
    s = Scenario(oss, CAT.hw("GB200"), "fp4", 1024, 32768)
    assert bytes_needed(s, 10) == pytest.approx(weight_bytes(oss, 0.5625, 2.0) + 10 * held)
    assert layout_bytes(s, 1, 10, "tp") == pytest.approx(bytes_needed(s, 10))
    assert max_batch(s, 1, Efficiency()) == math.floor((0.9 * 186e9 - weight_bytes(oss, 0.5625, 2.0)) / held)


def test_expert_parallel_step_pays_the_measured_all_to_all_latency():
    """Wide EP (DeepSeek-R1 on 64 GB200s): each of 61 layers dispatches and combines once, 25 us each by default
    (TensorRT-LLM's NVLink all-to-all, measured); a costly all-reduce keeps tensor parallel out of the comparison."""
    s = Scenario(CAT.model("DeepSeek-R1"), CAT.hw("GB200"), "fp8", 8192, 1024)
    ep_only = replace(IDEAL, layer_latency_s=1e-3)
    paid = decode_step_s(s, 64, 64, replace(ep_only, a2a_latency_s=Efficiency().a2a_latency_s))
    assert Efficiency().a2a_latency_s == 25e-6
    assert paid - decode_step_s(s, 64, 64, ep_only) == pytest.approx(2 * 61 * 25e-6)
    assert paid < 2 * 61 * 1e-3  # the expert-parallel layout was the one taken


def test_each_token_pays_its_work_outside_the_matmuls_and_wider_activations_set_the_expert_rate():
    """token_cost_s: per token (decode or prompt) per layer per unit of hidden width, spread over the devices;
    gpt-oss's MXFP4 experts run with MXFP8 activations on Blackwell, so at the fp8 rate."""
    from tokenfab.perf.model import matmul_s_per_token, prefill_pass

    s = Scenario(CAT.model("Llama-3.1-70B"), CAT.hw("B200"), "fp8", 1024, 1024)
    cost = replace(IDEAL, token_cost_s=1e-10)
    per_token = 80 * 8192 * 1e-10  # 65.5 us a token on an 8 TB/s part, whatever the precision
    assert decode_step_s(s, 4, 64, cost, prefill_tokens=64) - decode_step_s(s, 4, 64, IDEAL, prefill_tokens=64) == \
        pytest.approx(128 * per_token / 4)
    assert prefill_pass(s, 2, cost)[0] - prefill_pass(s, 2, IDEAL)[0] == pytest.approx(8192 * per_token / 2)
    h200 = replace(s, hardware=CAT.hw("H200"))  # 4.8 TB/s: the same work takes 8 / 4.8 times as long
    assert decode_step_s(h200, 1, 1, cost) - decode_step_s(h200, 1, 1, IDEAL) == pytest.approx(per_token * 8 / 4.8)
    oss, b200 = CAT.model("gpt-oss-120b"), CAT.hw("B200")
    experts = 114.71 * 4 / 128
    other = 5.13 - experts - 2 * 201088 * 2880 / 1e9  # attention etc. (bf16 in the checkpoint), without tables
    expected = 2e9 * (other / 2250 + 201088 * 2880 / 1e9 / 2250 + experts / 4500) / 1e12
    assert matmul_s_per_token(Scenario(oss, b200, "fp4"), b200) == pytest.approx(expected)


def test_moe_layers_pay_their_own_token_cost_and_attention_kernels_their_own_rate():
    """moe_token_cost_s: what a MoE model's token costs on top of token_cost_s (routing, permuting to the
    experts and back), per layer per unit of hidden width; a dense model pays none. eff_attention: decode
    attention where it is compute-bound (DeepSeek's absorbed MLA: 2 x 128 heads x (576 + 512) FLOPs per
    cached token-layer against 576 bytes of fp8 cache) runs at its own share of the bf16 peak."""
    oss, llama, b200 = CAT.model("gpt-oss-120b"), CAT.model("Llama-3.1-70B"), CAT.hw("B200")
    moe = replace(IDEAL, moe_token_cost_s=1e-10)
    s = Scenario(oss, b200, "fp4", 1024, 1024)
    assert decode_step_s(s, 1, 64, moe) - decode_step_s(s, 1, 64, IDEAL) == pytest.approx(64 * 36 * 2880 * 1e-10)
    dense = Scenario(llama, b200, "fp8", 1024, 1024)
    assert decode_step_s(dense, 1, 64, moe) == decode_step_s(dense, 1, 64, IDEAL)
    ds = Scenario(CAT.model("DeepSeek-R1"), b200, "fp4", 1024, 1024)
    flops = 2 * 256 * 61 * 1536 * 128 * (576 + 512)  # 256 sequences at mean context 1536, 61 layers
    assert flops / 2250e12 > 256 * 61 * 1536 * 576 / 8e12  # compute-bound at the peak
    half = replace(IDEAL, eff_attention=0.5)
    assert decode_step_s(ds, 1, 256, half) - decode_step_s(ds, 1, 256, IDEAL) == pytest.approx(flops / 2250e12)


def test_layouts_hold_and_read_what_they_copy():
    """Tensor parallel splits attention by KV head, so an MLA model's one latent cache is copied to (and read
    on) every rank; expert parallel with data-parallel attention keeps the non-expert weights whole on each
    device. Each layout's bytes decide whether it fits (SGLang's docs: TP duplicates an MLA model's KV cache)."""
    from tokenfab.perf.model import kv_share, layout_bytes, weight_bytes

    ds, b200 = CAT.model("DeepSeek-R1"), CAT.hw("B200")
    assert kv_share(ds, 8) == 1 and kv_share(CAT.model("Llama-3.1-70B"), 8) == 8
    assert kv_share(CAT.model("Llama-3.1-70B"), 16) == 8  # 16 ranks, 8 KV heads: each head on two ranks
    s = Scenario(ds, b200, "fp8", 8192, 1024)
    per_seq = 9216 * 61 * 576  # bytes of one full-length sequence's fp8 latent cache
    weights = weight_bytes(ds, 1.0, 1.0)
    assert layout_bytes(s, 8, 64, "tp") == pytest.approx(weights / 8 + 64 * per_seq)
    assert layout_bytes(s, 8, 64, "ep") == pytest.approx(weights - 654e9 + 654e9 / 8 + 64 * per_seq / 8)
    # 512 sequences: the copies overflow tensor parallel (84 + 166 GB a device), expert parallel holds them
    with pytest.raises(DoesNotFit):
        check_fit(replace(s, layout="tp"), 8, 512, Efficiency())
    check_fit(s, 8, 512, Efficiency())
    # a TP step reads the whole latent cache on each rank: 64 sequences at mean context 8,704
    tp = replace(s, layout="tp")
    split_kv = replace(tp, model=replace(ds, kv_heads=128))  # as if the cache split by head
    kv = 64 * 61 * 8704 * 576
    attn = 2 * 64 * 61 * 8704 * 128 * (576 + 512) / 2250e12 / 8  # a rank's 16 heads, compute time
    assert kv / 8e12 > attn > kv / 8 / 8e12
    assert decode_step_s(tp, 8, 64, IDEAL) - decode_step_s(split_kv, 8, 64, IDEAL) == pytest.approx(kv / 8e12 - attn)
    # a stated parallelism pins the sweep
    pinned = sweep(replace(s, devices=4, layout="ep", precision="fp4"))
    assert {p.extra["decode_devices"] for p in pinned.points} == {4}


def test_rows_state_their_parallelism(tmp_path):
    from tokenfab.perf.calibrate import configurations, parse_parallelism

    assert parse_parallelism("DEP4") == (4, "ep") and parse_parallelism("tp8") == (8, "tp")
    assert parse_parallelism("") == (0, "")
    with pytest.raises(CatalogError, match="TP<n> or DEP<n>"):
        parse_parallelism("PP2")
    row = next(a for a in load_anchors() if a.parallelism == "DEP4" and a.model == "DeepSeek-R1")
    bad = tmp_path / "rows.csv"  # a malformed parallelism is refused when the rows load, not skipped later
    lines = (Path(__file__).resolve().parent.parent / "src/tokenfab/perf/anchors.csv").read_text().splitlines()
    bad.write_text("\n".join([lines[0], next(x for x in lines if ",DEP4," in x).replace(",DEP4,", ",PP4,")]))
    with pytest.raises(CatalogError, match="'PP4'"):
        load_anchors(bad)
    assert [(s.devices, s.layout, s.spec_tokens) for s in configurations(CAT, row)] == [(4, "ep", 0)]


def test_sweep_ends_at_the_largest_batch_that_fits():
    """An engine runs as many sequences as its KV cache holds, so a capacity-bound curve ends there, not at
    the power of two below. Llama-3.1-8B bf16 on one H100: 16.06 GB of weights, 131,072 bytes of bf16 KV a
    token (32 layers x 2 x 8 heads x 128 x 2 B), 2,048 tokens a sequence; 90% of 80 GB usable."""
    from tokenfab.perf.model import max_batch

    s = Scenario(CAT.model("Llama-3.1-8B"), CAT.hw("H100"), "bf16", 1024, 1024)
    per_seq = 2048 * 131072
    assert max_batch(s, 1, Efficiency()) == math.floor((72e9 - 16.06e9) / per_seq) == 208
    assert max_batch(s, 2, Efficiency()) == math.floor((144e9 - 16.06e9) / per_seq) == 476  # weights split
    check_fit(s, 1, 208, Efficiency())
    with pytest.raises(DoesNotFit):
        check_fit(s, 1, 209, Efficiency())
    concs = sorted(p.concurrency for p in sweep(s, parallelisms=[1]).points)
    assert concs == [1, 2, 4, 8, 16, 32, 64, 128, 208]
    # a client cap below the capacity is the end instead; an explicit list is taken as given
    assert max(p.concurrency for p in sweep(replace(s, max_concurrency=100), parallelisms=[1]).points) == 100
    assert [p.concurrency for p in sweep(s, concurrencies=[4, 16], parallelisms=[1]).points] == [4, 16]


def test_kv_cache_sized_from_the_memory_the_weights_leave_free():
    """TensorRT-LLM gives the KV cache a fraction of the memory left after the weights
    (kv_cache_free_gpu_mem_fraction, 0.9 by default); vLLM and SGLang a fraction of the whole device.
    Llama-3.1-8B bf16 on one H100 at 0.9 of what 16.06 GB of weights leave free of 80 GB."""
    from tokenfab.perf.calibrate import configurations
    from tokenfab.perf.model import max_batch, usable_bytes

    s = Scenario(CAT.model("Llama-3.1-8B"), CAT.hw("H100"), "bf16", 1024, 1024, kv_free_fraction=0.9)
    assert usable_bytes(s, 1, "tp", Efficiency()) == pytest.approx(16.06e9 + 0.9 * (80e9 - 16.06e9))
    assert max_batch(s, 1, Efficiency()) == math.floor(0.9 * (80e9 - 16.06e9) / (2048 * 131072)) == 214
    with pytest.raises(DoesNotFit, match="GB missing"):
        check_fit(s, 1, 215, Efficiency())
    # a DeepSeek-R1 fp4 replica on four B200s (expert parallel) holds ~111 GB a device: the free fraction
    # leaves its KV cache about a fifth more room than 90% of the device does
    ds = Scenario(CAT.model("DeepSeek-R1"), CAT.hw("B200"), "fp4", 1024, 8192, devices=4, layout="ep")
    assert 1.15 < max_batch(replace(ds, kv_free_fraction=0.9), 4, Efficiency()) / max_batch(ds, 4, Efficiency()) < 1.3
    # TensorRT-LLM's perf-overview rows carry the default; the serving benchmarks state none
    rows = load_anchors()
    assert {a.kv_free_fraction for a in rows if "perf overview" in a.label} == {0.9}
    assert {a.kv_free_fraction for a in rows if "perf overview" not in a.label} == {0.0}
    row = next(a for a in rows if "perf overview" in a.label)
    assert {c.kv_free_fraction for c in configurations(CAT, row)} == {0.9}


def test_rows_with_a_malformed_kv_fraction_are_refused_naming_it(tmp_path):
    lines = (Path(__file__).resolve().parent.parent / "src/tokenfab/perf/anchors.csv").read_text().splitlines()
    bad = tmp_path / "rows.csv"
    bad.write_text("\n".join([lines[0], next(x for x in lines if x.endswith(",0.9"))[:-len("0.9")] + "1.5"]))
    with pytest.raises(CatalogError, match="kv_free_fraction '1.5'"):
        load_anchors(bad)
    r = subprocess.run([sys.executable, "-m", "tokenfab.cli", "curve", "--hardware", "B200", "--model",
                        "Llama-3.3-70B", "--kv-free-fraction", "2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--kv-free-fraction" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_moe_reads_only_touched_experts():
    s = Scenario(CAT.model("DeepSeek-R1"), CAT.hw("GB300"), "fp4", 1024, 1024)
    one = decode_step_s(s, 8, 1, IDEAL)
    many = decode_step_s(s, 8, 256, IDEAL)
    assert one < many < 256 * one


def test_sweep_respects_max_concurrency_and_reading_interpolates():
    from tokenfab.perf.calibrate import throughput_at_speed

    s = Scenario(CAT.model("Llama-3.1-70B"), CAT.hw("H200"), "fp8", 1024, 1024, max_concurrency=64)
    assert max(p.concurrency for p in sweep(s).points) == 64
    pts = [OperatingPoint(1, 100.0, 10.0), OperatingPoint(8, 50.0, 60.0), OperatingPoint(64, 10.0, 200.0),
           OperatingPoint(32, 9.0, 100.0)]  # the last is dominated
    assert throughput_at_speed(pts, 50.0) == pytest.approx(60.0)
    assert 60.0 < throughput_at_speed(pts, 30.0) < 200.0  # between its neighbours, monotone
    assert throughput_at_speed(pts, 101.0) == 0.0 and throughput_at_speed(pts, 5.0) == 200.0


def test_unstated_speculative_decoding_takes_the_better_of_with_and_without_mtp():
    from tokenfab.perf.calibrate import configurations

    rows = {(a.model, a.spec_decoding): a for a in load_anchors()}
    ds = configurations(CAT, rows[("DeepSeek-R1", "")])
    assert sorted(s.spec_tokens for s in ds) == [0, 1]
    assert [s.spec_tokens for s in configurations(CAT, rows[("DeepSeek-R1", "mtp")])] == [1]
    assert [s.spec_tokens for s in configurations(CAT, rows[("Llama-3.3-70B", "")])] == [0]  # no MTP heads


def test_usd_per_mtok_matches_inferencex_formula():
    assert usd_per_mtok_from_device_hour(2.0, 1000.0) == pytest.approx(2.0 * 1e6 / (1000.0 * 3600))
    p = point(Scenario(CAT.model("Llama-3.1-70B"), CAT.hw("H200"), "fp8", 1024, 1024), 4, 32)
    assert p.extra["usd_per_mtok"] == pytest.approx(1.41 * 1e6 / (p.tok_s_device * 3600))
    assert request_cost_usd(3.6e6, 3600, 0.10, 1.5, 2.0) == pytest.approx(0.15 + 2.0)


def test_curve_frontier_trades_speed_for_throughput():
    c = sweep(Scenario(CAT.model("Llama-3.1-70B"), CAT.hw("H200"), "fp8", 1024, 1024)).frontier()
    xs = [p.tok_s_user for p in c.points]
    ys = [p.tok_s_device for p in c.points]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True) and len(c.points) >= 3
    assert c.provenance.kind == "predicted"


def _opt(name, tpm_by_speed):
    pts = tuple(OperatingPoint(1, speed, tpm * 1.0, extra={"kw_per_device": 1000.0}) for speed, tpm in tpm_by_speed)
    return HardwareOption(name, Curve(name, pts, Provenance("predicted", "t", "t", "now")), 1000.0, 0.0)


def test_two_tier_lp_has_the_obvious_optimum():
    tiers = TierTable((Tier("fast", 0, 10.0, SLO(1000, 100), rank=0), Tier("slow", 0, 1.0, SLO(1000, 10), rank=1)))
    hw = _opt("x", [(100, 100.0), (10, 500.0)])  # tok/s per MW: 100 at the fast speed, 500 at the slow one
    plan = plan_factory(1.0, tiers, [hw])
    assert [(a["tier"], round(a["share"], 6)) for a in plan.allocation] == [("fast", 1.0)]  # $1000/MW-s vs $500
    capped = plan_factory(1.0, tiers, [hw], {"fast": TierDemand(max_share=0.6)})
    shares = {a["tier"]: a["share"] for a in capped.allocation}
    assert shares == pytest.approx({"fast": 0.6, "slow": 0.4})
    assert capped.revenue_usd_per_year == pytest.approx((0.6 * 100 * 10 + 0.4 * 500 * 1) / 1e6 * 365 * 24 * 3600)
    demand = plan_factory(1.0, tiers, [hw], {"fast": TierDemand(max_tok_s=30.0)})
    assert {a["tier"]: a["tok_s"] for a in demand.allocation}["fast"] == pytest.approx(30.0)


def test_impossible_slo_names_the_tier():
    tiers = TierTable((Tier("ultra", 0, 150.0, SLO(100, 5000), rank=0), Tier("free", 0, 0.0, SLO(1000, 1), rank=1)))
    hw = _opt("x", [(100, 100.0)])
    with pytest.raises(PlanError, match="tier ultra needs 5000 tok/s per user"):
        plan_factory(1.0, tiers, [hw], {"ultra": TierDemand(min_share=0.25)})
    assert plan_factory(1.0, tiers, [hw]).unserved == ["ultra"]


def test_bad_names_list_close_matches_and_memory_shortfall_is_quantified():
    with pytest.raises(CatalogError, match="did you mean H200"):
        CAT.hw("H2000")
    with pytest.raises(CatalogError, match="Llama-3.1-70B"):
        CAT.model("llama-3.1-7OB")
    s = Scenario(CAT.model("Llama-3.1-70B"), CAT.hw("H100"), "bf16", 1024, 1024)
    with pytest.raises(DoesNotFit, match=r"needs 142 GB but 1 x H100 offer 72 GB usable: 70 GB missing"):
        check_fit(s, 1, 1, Efficiency())


def test_tier_table_validation():
    assert default_tiers().names[0] == "premium"
    with pytest.raises(TierError, match="guaranteed shares add up to 1.20"):
        TierTable((Tier("a", 0, 0, SLO(1, 1), 0.6), Tier("b", 0, 0, SLO(1, 1), 0.6)))
    with pytest.raises(TierError, match="unique"):
        TierTable((Tier("a", 0, 0, SLO(1, 1)), Tier("a", 0, 0, SLO(1, 1))))


def test_calibration_recovers_known_efficiencies():
    """Synthetic rows made with known values of the fitted efficiencies (the others at their defaults, as
    `calibrate` keeps them) give those values back."""
    truth = Efficiency(eff_mem=0.55, eff_compute=0.30, eff_attention=0.5, eff_prefill=0.4, layer_latency_s=1e-5,
                       token_cost_s=3e-11, moe_token_cost_s=5e-11)
    anchors = [a for a in load_anchors() if a.metric == "tok_s_gpu" and a.comparable and predictable(CAT, a)]
    assert len(anchors) >= 20
    synthetic = [type(a)(**{**a.__dict__, "value": predict(CAT, a, truth)}) for a in anchors]
    synthetic = [a for a in synthetic if a.value > 0][::2]  # unreachable speeds drop out; half keeps it quick
    assert len(synthetic) >= 10
    fitted = calibrate(CAT, synthetic)
    for name in FIT:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.02), name
    errs = [abs(e) for e in errors(CAT, synthetic, fitted)]
    assert max(errs) < 0.01


def test_claims_are_computed_with_verdicts():
    from tokenfab.economics.claims import compute

    rows, systems = compute()
    assert len(rows) == 8 and all(r["verdict"] for r in rows)
    assert all(math.isfinite(r["model"]) and r["model"] > 1 for r in rows)  # every newer system is ahead
    assert systems["VR200"].revenue_per_year() > systems["GB300"].revenue_per_year() > systems["H200"].revenue_per_year()


def test_plan_and_curve_cli(tmp_path):
    f = tmp_path / "factory.yaml"
    f.write_text("power_mw: 100\nmodel: DeepSeek-R1\nisl: 8192\nosl: 1024\nhardware:\n  - {name: GB300}\n"
                 "  - {name: H200, precision: fp8, capex_usd_per_device: 30000}\n"
                 "demand:\n  free: {min_share: 0.1}\n")
    r = subprocess.run([sys.executable, "-m", "tokenfab.cli", "plan", str(f), "--out", str(tmp_path / "p")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "p" / "plan.md").read_text()
    assert "annual revenue" in md and (tmp_path / "p" / "curves.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "tokenfab.cli", "curve", "--hardware", "H20", "--model", "DeepSeek-R1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "did you mean H200" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    capped = subprocess.run([sys.executable, "-m", "tokenfab.cli", "curve", "--hardware", "B200", "--model",
                             "gpt-oss-120b", "--max-concurrency", "8"], capture_output=True, text=True, timeout=60)
    assert capped.returncode == 0, capped.stderr
    concs = [int(line.split()[1]) for line in capped.stdout.splitlines()[2:]]
    assert concs and max(concs) <= 8


def test_calibrate_cli_fits_a_measured_bench_curve(tmp_path):
    """`tokenfab calibrate` on a real `tokenfab bench` run of this project's engine (committed in docs/),
    then the fitted efficiencies drive `tokenfab curve`; bad files and names exit 2 with one line."""
    import json
    from pathlib import Path

    summary = Path(__file__).resolve().parent.parent / "docs" / "img" / "bench-run" / "summary.json"
    out = tmp_path / "eff.json"
    cli = [sys.executable, "-m", "tokenfab.cli"]
    r = subprocess.run(cli + ["calibrate", "--curve", str(summary), "--hardware", "CPU-2core", "--model",
                              "SmolLM2-135M", "--fit", "eff_mem,eff_compute,eff_prefill,step_overhead_s",
                              "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["rows"] == 7 and data["fitted"] == ["eff_mem", "eff_compute", "eff_prefill", "step_overhead_s"]
    assert data["median_abs_error_fitted"] < data["median_abs_error_default"]
    assert data["efficiency"]["layer_latency_s"] == Efficiency().layer_latency_s  # not fitted, kept
    c = subprocess.run(cli + ["curve", "--hardware", "CPU-2core", "--model", "SmolLM2-135M", "--precision", "bf16",
                              "--isl", "128", "--osl", "64", "--efficiency", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert c.returncode == 0, c.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"eff_mem": -1}')
    b = subprocess.run(cli + ["claims", "--efficiency", str(bad)], capture_output=True, text=True, timeout=60)
    assert b.returncode == 2 and "eff_mem must be non-negative" in b.stderr and len(b.stderr.strip().splitlines()) == 1
    f = subprocess.run(cli + ["calibrate", "--fit", "eff_bogus"], capture_output=True, text=True, timeout=60)
    assert f.returncode == 2 and "cannot fit eff_bogus" in f.stderr


def test_measured_curve_rows_cap_the_sweep_at_the_runs_concurrency(tmp_path):
    import json

    from tokenfab.perf.calibrate import load_efficiency, measured_from_curve

    pts = (OperatingPoint(1, 50.0, 40.0), OperatingPoint(8, 20.0, 150.0), OperatingPoint(16, 0.0, 0.0))
    rows = measured_from_curve(Curve("run", pts, Provenance("measured", "t", "t", "now")), "CPU-2core",
                               "SmolLM2-135M", "bf16", 128, 64)
    # the point with no throughput is left out, and so is its concurrency from the cap
    assert [(r.value, r.at_tok_s_user, r.max_concurrency) for r in rows] == [(40.0, 50.0, 8), (150.0, 20.0, 8)]
    assert all(r.comparable and r.serving == "aggregated" and r.spec_decoding == "none" for r in rows)
    f = tmp_path / "e.json"
    f.write_text(json.dumps({"efficiency": {"nope": 1}}))
    with pytest.raises(CatalogError, match="unknown efficiency nope"):
        load_efficiency(f)
    f.write_text(json.dumps({"eff_mem": 0.8}))
    assert load_efficiency(f) == Efficiency(eff_mem=0.8)


def test_built_in_efficiency_sets_load_by_name_and_drive_the_cli():
    """`--efficiency tensorrt-llm-offline` / `serving-benchmarks`: per-stack fits shipped as data; an unknown
    name that is no file either says which sets exist."""
    from tokenfab.perf.calibrate import efficiency_sets, load_efficiency

    sets = efficiency_sets()
    assert set(sets) == {"tensorrt-llm-offline", "serving-benchmarks"} and all(s["about"] for s in sets.values())
    trt = load_efficiency("tensorrt-llm-offline")
    assert trt.eff_compute == sets["tensorrt-llm-offline"]["efficiency"]["eff_compute"]
    assert trt.layer_latency_s == Efficiency().layer_latency_s  # unnamed: the default
    assert load_efficiency("serving-benchmarks").eff_compute < trt.eff_compute
    with pytest.raises(CatalogError, match="not a built-in set .*tensorrt-llm-offline"):
        load_efficiency("tensorrt-llm")
    cli = [sys.executable, "-m", "tokenfab.cli", "curve", "--hardware", "B200", "--model", "Llama-3.3-70B",
           "--precision", "fp4"]
    fast, slow = (subprocess.run(cli + ["--efficiency", name], capture_output=True, text=True, timeout=60)
                  for name in ("tensorrt-llm-offline", "serving-benchmarks"))
    assert fast.returncode == 0 and slow.returncode == 0, fast.stderr + slow.stderr
    assert fast.stdout != slow.stdout
    bad = subprocess.run(cli + ["--efficiency", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "built-in set" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
