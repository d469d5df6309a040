"""Synthetic fallback, the Hugging Face folder loader, the GGUF tokenizer and the chat template."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from tokenfab.engine.config import EngineConfig
from tokenfab.engine.llm_engine import LLMEngine
from tokenfab.engine.loader import load_model
from tokenfab.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def test_synthetic_fallback_is_labelled_and_runs():
    lm = load_model(EngineConfig(model="synthetic", synthetic_layers=2))
    assert lm.synthetic and "synthetic" in lm.name and "synthetic" in lm.source
    eng = LLMEngine(EngineConfig(model="synthetic", synthetic_layers=2, dtype="float32"), loaded=lm)
    text = "héllo wörld"
    assert eng.tokenizer.decode(eng.tokenizer.encode(text)) == text
    out = eng.generate([eng.tokenizer.encode(text)], GREEDY)[0]
    assert len(out) == 10 and max(out) < eng.tokenizer.vocab_size  # logits limited to the tokenizer's vocab


def test_missing_bundled_model_falls_back_to_synthetic(monkeypatch):
    import tokenfab.engine.loader as loader

    monkeypatch.setattr(loader, "bundled_gguf_path", lambda: None)
    lm = loader.load_model(EngineConfig(synthetic_layers=1))
    assert lm.synthetic


def test_hf_folder_loads_same_function_as_engine_weights(tmp_path):
    """Write a synthetic model as a Hugging Face folder; the loaded engine must produce identical tokens."""
    cfg = EngineConfig(model="synthetic", synthetic_layers=2, dtype="float32", linear_kernel="dense")
    lm = load_model(cfg)
    a = lm.args
    t = {"model.embed_tokens.weight": lm.weights["embed"], "model.norm.weight": lm.weights["norm"]}
    names = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
             "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
             "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
             "down": "mlp.down_proj.weight"}
    for i in range(a.num_layers):
        for ours, hf in names.items():
            t[f"model.layers.{i}.{hf}"] = lm.weights[f"layers.{i}.{ours}"].contiguous()
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": a.vocab_size, "hidden_size": a.hidden_size,
        "intermediate_size": a.intermediate_size, "num_hidden_layers": a.num_layers,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads, "rms_norm_eps": a.rms_eps,
        "rope_theta": a.rope_theta, "max_position_embeddings": a.max_position, "tie_word_embeddings": True,
        "eos_token_id": 257,
    }))
    lm.tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": lm.tokenizer.chat_template,
                                                                "eos_token": "<|im_end|>"}))
    hf = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", linear_kernel="dense"))
    assert not hf.loaded.synthetic and hf.loaded.args == lm.args
    base = LLMEngine(cfg, loaded=lm)
    prompt = base.tokenizer.encode("abc def")
    assert hf.tokenizer.encode("abc def") == prompt
    assert hf.generate([prompt], GREEDY) == base.generate([prompt], GREEDY)
    assert "<|im_start|>assistant" in hf.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
    # the gateway in front of other engines loads the same tokenizer from the folder alone, chat template included
    from tokenfab.tokenizer import load_tokenizer

    alone = load_tokenizer(str(tmp_path))
    chat = [{"role": "user", "content": "x"}]
    assert alone.encode_chat(chat) == hf.tokenizer.encode_chat(chat) and alone.eos_token_ids == hf.tokenizer.eos_token_ids


def test_llama3_rope_scaling_changes_low_frequencies_only():
    from tokenfab.engine.config import ModelArgs
    from tokenfab.engine.model import rope_inv_freq

    base = ModelArgs(vocab_size=10, hidden_size=128, intermediate_size=8, num_layers=1, num_heads=1,
                     num_kv_heads=1, head_dim=128, rope_theta=500000.0)
    scaled = ModelArgs(**{**base.__dict__, "rope_scaling": (("factor", 8.0), ("high_freq_factor", 4.0),
                                                            ("low_freq_factor", 1.0),
                                                            ("original_max_position_embeddings", 8192),
                                                            ("rope_type", "llama3"))})
    f0, f1 = rope_inv_freq(base), rope_inv_freq(scaled)
    assert torch.allclose(f0[:8], f1[:8])  # high frequencies untouched
    assert torch.allclose(f1[-1], f0[-1] / 8)  # lowest frequency divided by the factor


def test_gguf_tokenizer_and_chat_template(real_model):
    tok = real_model.tokenizer
    text = "Café 東京 😀 and 12345"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user")
    assert ids[0] == 1  # <|im_start|> is one special token
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert 2 in tok.eos_token_ids


def test_dequantised_weights_are_cached_by_content_not_by_mtime(tmp_path):
    """Reinstalling the model package gives the same file a new mtime: the cache must not grow a copy."""
    import os
    import shutil

    from tokenfab.engine.loader import BUNDLED_SHA256, bundled_gguf_path, load_gguf

    gguf = tmp_path / "model.gguf"
    shutil.copyfile(bundled_gguf_path(), gguf)
    cache = tmp_path / "cache"
    cfg = EngineConfig(cache_dir=str(cache))
    load_gguf(gguf, cfg, name="m", expect_sha_prefix=BUNDLED_SHA256)
    [first] = cache.glob("model-*.pt")
    built = first.stat().st_mtime_ns
    os.utime(gguf, (1_000_000_000, 1_000_000_000))  # the same bytes, a new mtime
    load_gguf(gguf, cfg, name="m", expect_sha_prefix=BUNDLED_SHA256)
    assert list(cache.glob("model-*.pt")) == [first] and first.stat().st_mtime_ns == built  # reused, not rebuilt
    assert first.name.startswith("model-" + BUNDLED_SHA256)
