"""Reading a request body safely: bounded in bytes and in JSON objects, strict JSON, then a request model.

Strict means what every JSON parser downstream will accept too: no NaN or Infinity, no lone UTF-16
surrogates (they cannot be encoded as UTF-8, so no tokenizer or response could carry them), integers
within Python's digit limit, nesting within its recursion limit. Each refusal is a 400 that says
what was wrong; none of them can reach the handler as an exception.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from tokenfab.serve.protocol import APIError, validation_error

# A chat request is a handful of objects; this many is far beyond any real one, and parsing stops
# there instead of building a few hundred thousand dicts on the event loop.
MAX_JSON_OBJECTS = 20_000

_Model = TypeVar("_Model", bound=BaseModel)


class _TooManyObjects(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes, max_objects: int = MAX_JSON_OBJECTS) -> Any:
    if not raw.strip():
        raise APIError(400, "request body is empty: send a JSON object")
    count = 0

    def count_object(obj: dict[str, Any]) -> dict[str, Any]:
        nonlocal count
        count += 1
        if count > max_objects:
            raise _TooManyObjects
        return obj

    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        value = json.loads(raw, object_hook=count_object, parse_constant=refuse_constant)
    except _TooManyObjects:
        raise APIError(400, f"request body holds more than {max_objects} JSON objects") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply to parse") from None
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8") from None
    except ValueError as exc:  # JSONDecodeError, an integer with too many digits, NaN / Infinity
        msg = str(exc).splitlines()[0]
        if "integer string conversion" in msg:
            msg = "an integer has more digits than the 4300 this server reads"
        raise APIError(400, f"request body is not valid JSON: {msg}") from None
    # surrogates can only arrive as \u escapes, so a body without one cannot hold a lone surrogate
    if (b"\\ud" in raw or b"\\uD" in raw) and _has_lone_surrogate(value):
        raise APIError(400, "request body holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), "
                       "which is not text: encode the string as UTF-8")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def validate(value: Any, model_cls: type[_Model]) -> _Model:
    if not isinstance(value, dict):
        raise APIError(400, f"request body must be a JSON object, got {_JSON_KINDS.get(type(value), 'another value')}")
    try:
        return model_cls.model_validate(value)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def until_disconnect(request: Request, coro: Any) -> Any:
    """Await `coro`, or cancel it (aborting the sequence) if the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    try:
        await work
    except asyncio.CancelledError:
        pass
    return None
