"""Engine invariants on the real bundled model (fp32, dense kernels, so equality is exact)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenfab.engine import cpu_kernels
from tokenfab.engine.sampling import SamplingParams

from conftest import make_engine

PROMPTS = [
    "Once upon a time, in a quiet village by the sea,",
    "The three primary colours are",
    "def fibonacci(n):\n    ",
    "Write a haiku about autumn leaves falling on a river in the evening light, slowly.",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(real_model):
    return make_engine(real_model)


def test_batched_greedy_equals_each_alone(engine):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    alone = [engine.generate([p], GREEDY)[0] for p in ids]
    together = engine.generate(ids, GREEDY)
    assert together == alone
    assert all(len(o) == 24 for o in together)


def _reference_logits(model, ids: list[int]) -> torch.Tensor:
    """Plain contiguous-cache forward (no paging, full causal attention), for every position."""
    a = model.args
    x = model.embed[torch.tensor(ids)]
    cos, sin = model.rope_tables(torch.arange(len(ids)))
    for attn_norm, qkv_p, o_p, ffn_norm, gu_p, down_p in model.layers:
        h = F.rms_norm(x, (x.shape[-1],), attn_norm[: x.shape[-1]], a.rms_eps)  # the model keeps each norm weight twice
        qkv = h @ qkv_p.weight.T
        q, k, v = qkv.split([model.q_size, model.kv_size, model.kv_size], dim=-1)
        q = model._apply_rope(q.view(len(ids), a.num_heads, a.head_dim), cos, sin).transpose(0, 1)
        k = model._apply_rope(k.view(len(ids), a.num_kv_heads, a.head_dim), cos, sin).transpose(0, 1)
        v = v.view(len(ids), a.num_kv_heads, a.head_dim).transpose(0, 1)
        rep = a.num_heads // a.num_kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = (q @ k.transpose(1, 2)) / math.sqrt(a.head_dim)
        att = att.masked_fill(torch.triu(torch.ones(len(ids), len(ids), dtype=torch.bool), 1), float("-inf"))
        o = (att.softmax(-1) @ v).transpose(0, 1).reshape(len(ids), -1)
        x = x + o @ o_p.weight.T
        h = F.rms_norm(x, (x.shape[-1],), ffn_norm[: x.shape[-1]], a.rms_eps)
        gu = h @ gu_p.weight.T
        f = gu.shape[-1] // 2
        x = x + (F.silu(gu[:, :f]) * gu[:, f:]) @ down_p.weight.T
    x = F.rms_norm(x, (x.shape[-1],), model.norm[: x.shape[-1]], a.rms_eps)
    return x @ model.lm_head.weight.T


@pytest.mark.parametrize("built_kernel", [True, False], ids=["cpu-kernel", "torch-ops"])
def test_paged_attention_matches_contiguous_reference(real_model, built_kernel):
    eng = make_engine(real_model, block_size=4, max_num_batched_tokens=7)  # many blocks, chunked prefill
    if built_kernel and not eng.model.use_cpu_kernels:
        pytest.skip(f"CPU kernel not in use: {cpu_kernels.describe()}")
    eng.model.use_cpu_kernels = built_kernel
    prompt = eng.tokenizer.encode(PROMPTS[3])
    rid = eng.add_request(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    seq = eng.seqs[rid]
    captured: list[torch.Tensor] = []
    orig = eng.model.forward

    def spy(batch, kv):
        out = orig(batch, kv)
        if out.numel():
            captured.append(out[0].clone())
        return out

    eng.model.forward = spy
    while rid in eng.seqs:
        eng.step()
    tokens = seq.token_ids
    with torch.inference_mode():
        ref = _reference_logits(eng.model, tokens[:-1])
    ref_rows = ref[len(prompt) - 1 :]
    assert len(captured) == len(ref_rows) == 12
    for got, want in zip(captured, ref_rows):
        assert torch.allclose(got, want.float(), atol=2e-3, rtol=1e-4), (got - want).abs().max()


def test_prefix_cache_hit_equals_miss(real_model):
    eng = make_engine(real_model, block_size=8)
    shared = "You are a meticulous assistant. Answer briefly and precisely. " * 3
    prompt = eng.tokenizer.encode(shared + "Name a colour.")
    miss = eng.generate([prompt], GREEDY)[0]
    assert eng.block_manager.hits_tokens == 0
    rid = eng.add_request(prompt, GREEDY)
    seq = eng.seqs[rid]
    hit: list[int] = []
    while rid in eng.seqs:
        for o in eng.step():
            hit.extend(o.token_ids)
    assert seq.num_cached_prompt >= (len(prompt) - 1) // 8 * 8 > 0
    assert hit == miss
    # a different suffix still reuses the shared prefix
    other = eng.tokenizer.encode(shared + "Name a fruit.")
    before = eng.block_manager.hits_tokens
    eng.generate([other], GREEDY)
    assert eng.block_manager.hits_tokens > before


def test_preemption_under_tiny_kv_budget_completes_everything(real_model):
    ids = [real_model.tokenizer.encode(p) for p in PROMPTS]
    big = make_engine(real_model)
    alone = [big.generate([p], GREEDY)[0] for p in ids]
    # 16 blocks x 4 slots = 64 slots for 4 sequences needing up to ~45 each
    tiny = make_engine(real_model, block_size=4, num_kv_blocks=16, enable_prefix_caching=False)
    together = tiny.generate(ids, GREEDY)
    assert tiny.scheduler.num_preemptions > 0
    assert together == alone
    assert tiny.block_manager.num_free == 16


def test_chunked_prefill_equals_whole_prefill(real_model):
    prompt = real_model.tokenizer.encode(PROMPTS[3] * 3)
    whole = make_engine(real_model, max_num_batched_tokens=4096).generate([prompt], GREEDY)[0]
    chunked = make_engine(real_model, max_num_batched_tokens=5).generate([prompt], GREEDY)[0]
    assert chunked == whole


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    a = engine.generate([ids[0]], sp)[0]
    b = engine.generate(ids, [sp, SamplingParams(max_tokens=5, temperature=1.0, seed=7)])[0]
    assert a == b
    c = engine.generate([ids[0]], SamplingParams(max_tokens=16, temperature=0.9, seed=99, ignore_eos=True))[0]
    assert c != a


def test_stop_strings_truncate_and_finish(engine):
    prompt = engine.tokenizer.encode(PROMPTS[0])
    full = engine.tokenizer.decode(engine.generate([prompt], GREEDY)[0])
    stop = full[10:14]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,)))
    text, last = "", None
    while rid in engine.seqs:
        for o in engine.step():
            text += o.text
            last = o
    assert last.finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_min_tokens_blocks_eos(engine):
    prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}]))
    out = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, min_tokens=30))[0]
    assert len(out) >= 30
    assert not set(out[:29]) & engine.tokenizer.eos_token_ids


def test_request_too_long_is_refused_with_both_lengths(engine):
    from tokenfab.engine.llm_engine import RequestError

    with pytest.raises(RequestError, match=r"2048 tokens.*2100 were requested \(2000 in the prompt, 100"):
        engine.add_request([5] * 2000, SamplingParams(max_tokens=100))


def test_weight_only_kernels_track_dense(real_model):
    """The auto kernel runs the GGUF's Q4 tensors as int4 without re-rounding them, and the tied
    embedding (Q8_0) as int8; each small-batch kernel computes the same function as its dense path."""
    eng = make_engine(real_model, dtype="float32", linear_kernel="auto", small_batch_max_tokens=4)
    layer = eng.model.layers[0]
    assert [lin.kind for lin in (layer[1], layer[2], layer[4], layer[5])] == ["int4"] * 4
    assert eng.model.lm_head.kind == "int8"
    qkv = layer[1]
    # the int4 path's dense weights are the loaded (Q4_1-dequantised) weights themselves
    args = eng.model.args
    wq = real_model.weights["layers.0.q"].float()
    assert torch.allclose(qkv.weight[: args.num_heads * args.head_dim], wq, atol=1e-6)
    for lin in (qkv, eng.model.lm_head):
        x = torch.randn(3, lin.weight.shape[1])
        assert torch.allclose(lin(x), F.linear(x, lin.weight), atol=1e-3, rtol=1e-3)
    prompt = eng.tokenizer.encode(PROMPTS[1])
    out = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert len(out) == 8


def test_int4_packing_accepts_only_weights_on_a_4bit_grid():
    from tokenfab.engine.model import _as_int4_groups

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 64), generator=g).float()
    q[:, 0::32], q[:, 1::32] = 0, 15  # Q4_1 takes each block's min and max as its end levels
    d = torch.rand(32, 2, generator=g).repeat_interleave(32, dim=1) + 0.01
    lo = torch.randn(32, 2, generator=g).repeat_interleave(32, dim=1)
    packed = _as_int4_groups(q * d + lo)
    assert packed is not None
    qi, sz = packed
    assert sz.shape == (2, 32, 2)
    assert torch.equal(qi.float(), q)
    assert _as_int4_groups(torch.randn(32, 64, generator=g)) is None  # ordinary weights keep int8
    assert _as_int4_groups(torch.randn(8, 64, generator=g)) is None  # the kernel needs N % 16 == 0


@pytest.mark.parametrize("past", [0, 300])
@pytest.mark.parametrize("use_sdpa", [False, True], ids=["blocked", "sdpa-where-chosen"])
def test_prefill_attention_matches_sdpa_in_bf16(real_model, past, use_sdpa):
    """Prefill attention in bf16 (the blocked form: bf16 scores, fp32 softmax; or SDPA, which the model
    picks for whole prompts on GPUs and AMX CPUs) vs an fp32 SDPA reference on the same inputs."""
    eng = make_engine(real_model, dtype="bfloat16")
    eng.model.prefill_sdpa = use_sdpa
    a = eng.model.args
    g = torch.Generator().manual_seed(1)
    n = 600  # more than two query blocks, the last one partial
    q = torch.randn(n, a.num_heads, a.head_dim, generator=g).bfloat16()
    k = torch.randn(a.num_kv_heads, past + n, a.head_dim, generator=g).bfloat16()
    v = torch.randn(a.num_kv_heads, past + n, a.head_dim, generator=g).bfloat16()
    got = eng.model._prefill_attention(q, k, v, past).float()
    mask = torch.arange(past + n)[None, :] <= (past + torch.arange(n))[:, None]
    want = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.float()[None], v.float()[None],
                                          attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    assert (got - want).abs().max() < 0.03
    assert (got - want).abs().mean() < 2e-3


def test_dense_bf16_weights_are_held_prepacked_and_compute_the_same():
    from tokenfab.engine.model import Linear

    g = torch.Generator().manual_seed(5)
    w = torch.randn(960, 576, generator=g).bfloat16()
    b = torch.randn(960, generator=g).bfloat16()
    lin = Linear(w, b, "dense", 0)
    if lin.packed is None:
        pytest.skip("no oneDNN pre-packing in this torch build: F.linear is used")
    assert lin._weight is None  # one copy of the weights, the packed one
    assert torch.equal(lin.weight, w)
    for m in (1, 13, 64, 300):  # any row count, not only the packing hint
        x = torch.randn(m, 576, generator=g).bfloat16()
        assert torch.equal(lin(x), F.linear(x, w, b))
    assert Linear(w.float(), None, "dense", 0).packed is None  # fp32 keeps F.linear
