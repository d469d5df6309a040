"""The OpenAI-compatible server on loopback, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=60)


def _wait_idle(server, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(server.base_url + "/health").json()
        if h["in_flight"] == 0 and h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.02)
    raise AssertionError(f"server did not go idle: {h}")


def test_models_lists_the_real_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["synthetic"] is False


def test_chat_non_streaming_usage_matches_tokenizer(client, real_model):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    assert r.object == "chat.completion"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    prompt = real_model.tokenizer.apply_chat_template(MESSAGES)
    assert r.usage.prompt_tokens == len(real_model.tokenizer.encode(prompt))
    assert 1 <= r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_length_and_usage(client, real_model):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == len(real_model.tokenizer.encode(prompt))
    assert r.choices[0].text


def test_completion_accepts_token_ids(client):
    r = client.completions.create(model=MODEL, prompt=[504, 2365, 6354], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 3


def test_streaming_equals_non_streaming_and_reports_usage(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # without include_usage there is no usage chunk
    plain = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.usage is None for c in plain)


def test_completion_streaming(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert text == full.choices[0].text


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[8:12]
    r = client.completions.create(**kw, stop=[stop, "zzzz-never"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_seeded_sampling_reproducible(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(**kw, seed=42).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=42).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1


def _post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.base_url + path, content=data, headers={"content-type": "application/json"}, **kw)


BAD_INPUTS = [
    ("malformed json", "/v1/chat/completions", b'{"model": ', 400, "not valid JSON"),
    ("empty body", "/v1/completions", b"", 400, "empty"),
    ("wrong type", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("messages not a list", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": MESSAGES}, 404, "gpt-9"),
    ("max_tokens < 1", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "at least 1"),
    ("n > 1", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 3}, 400, "n=3 is not supported"),
    ("temperature range", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 9}, 400, "temperature"),
    ("token id out of range", "/v1/completions", {"model": MODEL, "prompt": [1, 99999999]}, 400, "token ids"),
    ("logprobs", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "logprobs": True}, 400, "logprobs"),
]


@pytest.mark.parametrize("name,path,body,status,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, client, name, path, body, status, needle):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower()
    assert set(err) == {"message", "type", "param", "code"}
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_prompt_longer_than_context_says_both_lengths(server, client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="word " * 1100, max_tokens=10)
    msg = exc.value.body["message"]
    assert "1024" in msg and "in the prompt" in msg and exc.value.body["code"] == "context_length_exceeded"


def test_oversized_body_is_413(server):
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * 70_000})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert httpx.get(server.base_url + "/health").json()["status"] == "ok"


def test_unknown_route_is_openai_404(server):
    r = httpx.get(server.base_url + "/v1/nope")
    assert r.status_code == 404 and "routes" in r.json()["error"]["message"]


def test_client_disconnect_aborts_and_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert httpx.get(server.base_url + "/health").json()["in_flight"] == 1
    h = _wait_idle(server)
    assert h["kv_cache_usage"] == 0.0
    # a non-streaming request whose client times out is aborted too
    with pytest.raises(httpx.ReadTimeout):
        _post(server, "/v1/completions", {**body, "stream": False}, timeout=0.5)
    _wait_idle(server)


def test_concurrent_requests_all_complete(client):
    import concurrent.futures as cf

    def one(i):
        return client.completions.create(model=MODEL, prompt=f"Number {i}:", max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True}).usage.completion_tokens

    with cf.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(16))) == [6] * 16


def test_health_says_which_kernels_run(server):
    k = httpx.get(server.base_url + "/health").json()["kernels"]
    assert set(k) == {"decode_attention", "norm_rope_silu_argmax", "matmuls", "prefill_attention"}
    from tokenfab.engine import cpu_kernels

    if cpu_kernels.available():  # the test server runs the bundled model in bf16 on the CPU
        assert k["decode_attention"] == "paged, read in place"
        assert k["norm_rope_silu_argmax"].startswith("CPU kernels, built for this CPU")
