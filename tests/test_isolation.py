"""One request never harms another inside the engine: hostile sampling values are refused before a
step, and a sequence whose step still raises fails alone while the rest finish unchanged."""

from __future__ import annotations

import pytest

from tokenfab.engine.sampling import SamplingParams

from conftest import make_engine

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]


@pytest.fixture(scope="module")
def engine(real_model):
    return make_engine(real_model)


@pytest.mark.parametrize("kw,needle", [
    ({"temperature": float("nan")}, "temperature must be within"),
    ({"temperature": float("inf")}, "temperature must be within"),
    ({"temperature": -1e-9}, "temperature must be within"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -2}, "top_k must be -1 or 0"),
    ({"seed": 2**64}, "seed must be within"),
    ({"seed": -(2**63) - 1}, "seed must be within"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty must be within"),
    ({"presence_penalty": -2.5}, "presence_penalty must be within"),
    ({"stop": ("",)}, "must not be empty"),
    ({"stop": ("x" * 5000,)}, "at most 1024 characters"),
    ({"min_tokens": 20, "max_tokens": 5}, "min_tokens must be between"),
])
def test_unsafe_sampling_values_are_refused_naming_the_range(kw, needle):
    with pytest.raises(ValueError, match=None) as exc:
        SamplingParams(**kw)
    assert needle in str(exc.value)


def test_tiny_temperatures_sample_greedily_instead_of_overflowing(engine):
    ids = [engine.tokenizer.encode(PROMPTS[0])]
    greedy = engine.generate(ids, GREEDY)[0]
    for t in (1e-45, 5e-324, 1e-6):  # 1e-45 made torch.multinomial raise on NaN probabilities
        assert engine.generate(ids, SamplingParams(max_tokens=16, temperature=t, ignore_eos=True))[0] == greedy


def _poison(params: SamplingParams, **fields) -> SamplingParams:
    """Params with values validation would refuse, as a bug in a caller (or a missed check) would pass."""
    for k, v in fields.items():
        object.__setattr__(params, k, v)
    return params


def _run(eng, prompts, params):
    rids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    toks = {r: [] for r in rids}
    final = {}
    while len(final) < len(rids):
        for o in eng.step():
            toks[o.request_id].extend(o.token_ids)
            if o.finished:
                final[o.request_id] = o
    return [(toks[r], final[r]) for r in rids]


def test_a_sequence_whose_sampling_raises_fails_alone(real_model):
    eng = make_engine(real_model)
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    alone = [eng.generate([p], GREEDY)[0] for p in ids]
    bad = _poison(SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True), temperature=float("nan"))
    # the poisoned row samples (NaN is not below the greedy threshold), gets NaN probabilities and raises
    out = _run(eng, [ids[0], ids[1], ids[0], ids[2]], [GREEDY, GREEDY, bad, GREEDY])
    assert [t for t, _ in (out[0], out[1], out[3])] == [alone[0], alone[1], alone[2]]
    assert all(o.finish_reason == "length" and o.error is None for _, o in (out[0], out[1], out[3]))
    toks, fail = out[2]
    assert fail.finish_reason == "error" and "probability tensor" in fail.error and toks == []
    assert fail.metering is not None and fail.completion_tokens == 0
    assert eng.block_manager.usage() == 0.0 and not eng.seqs and not eng.has_work()


def test_a_sequence_whose_forward_pass_raises_fails_alone(real_model):
    eng = make_engine(real_model)
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    alone = [eng.generate([p], GREEDY)[0] for p in ids]
    rids = [eng.add_request(p, GREEDY) for p in ids]
    eng.seqs[rids[1]].token_ids[2] = 10**9  # past the embedding table: the batched forward raises
    toks = {r: [] for r in rids}
    final = {}
    while len(final) < 3:
        for o in eng.step():
            toks[o.request_id].extend(o.token_ids)
            if o.finished:
                final[o.request_id] = o
    assert toks[rids[0]] == alone[0] and toks[rids[2]] == alone[2]
    assert final[rids[1]].finish_reason == "error" and "IndexError" in final[rids[1]].error
    assert eng.block_manager.usage() == 0.0


def test_out_of_range_prompt_ids_are_refused_at_add(engine):
    from tokenfab.engine.llm_engine import RequestError

    with pytest.raises(RequestError, match=r"token ids must be in \[0, "):
        engine.add_request([1, 2, engine.vocab_limit], GREEDY)
    with pytest.raises(RequestError, match="got -1"):
        engine.add_request([-1], GREEDY)
