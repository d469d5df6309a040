"""OpenAI's response shapes for completions and chat completions: whole responses, stream chunks, usage."""

from __future__ import annotations

import abc
import json
import time
from typing import Any

from tokenfab.generation import RequestOutput


def usage_body(o: RequestOutput) -> dict[str, Any]:
    return {
        "prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": o.cached_tokens},
    }


class Format(abc.ABC):
    object_full = ""
    object_chunk = ""

    def __init__(self, rid: str, model: str) -> None:
        self.rid, self.model, self.created = rid, model, int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def usage_chunk(self, last: RequestOutput) -> dict[str, Any]:
        return {**self._base(self.object_chunk), "choices": [], "usage": usage_body(last)}

    @abc.abstractmethod
    def first(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def chunk(self, text: str, finish: str | None) -> dict[str, Any]: ...

    @abc.abstractmethod
    def full(self, text: str, last: RequestOutput) -> dict[str, Any]: ...


class CompletionFormat(Format):
    object_full = object_chunk = "text_completion"

    def first(self) -> dict[str, Any]:
        return self.chunk("", None)

    def chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        return {**self._base(self.object_chunk),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def full(self, text: str, last: RequestOutput) -> dict[str, Any]:
        return {**self._base(self.object_full),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": usage_body(last)}


class ChatFormat(Format):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def first(self) -> dict[str, Any]:
        return {**self._base(self.object_chunk),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}

    def chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {**self._base(self.object_chunk),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def full(self, text: str, last: RequestOutput) -> dict[str, Any]:
        return {**self._base(self.object_full),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": last.finish_reason}],
                "usage": usage_body(last)}


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
