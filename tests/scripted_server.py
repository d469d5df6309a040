"""A loopback OpenAI-style server that emits tokens at known times, for checking bench's measurements."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class Script:
    ttft_s = 0.100
    gap_s = 0.020


async def completions(request: Request) -> Response:
    body = await request.json()
    model = body["model"]
    n = int(body.get("max_tokens") or 16)
    if model == "fail-500":
        return JSONResponse({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}, 500)
    if model == "needs-key" and request.headers.get("authorization") != "Bearer good":
        return JSONResponse({"error": {"message": "bad key", "type": "auth", "param": None, "code": None}}, 401)
    chat = request.url.path.endswith("chat/completions")

    def chunk(text: str, finish: str | None = None) -> bytes:
        if chat:
            ch = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
        else:
            ch = {"index": 0, "text": text, "finish_reason": finish}
        return b"data: " + json.dumps({"choices": [ch]}).encode() + b"\n\n"

    if model == "nonstream":
        await asyncio.sleep(Script.ttft_s)
        return JSONResponse({"choices": [{"index": 0, "message": {"content": "tok " * n}, "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}})

    async def gen():
        start = time.perf_counter()
        for i in range(n):
            target = start + Script.ttft_s + i * Script.gap_s
            await asyncio.sleep(max(0.0, target - time.perf_counter()))
            if model == "truncate" and i == n // 2:
                return  # connection closes mid-stream without finish_reason
            yield chunk(f"t{i} ", "length" if i == n - 1 else None)
        yield b"data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n,
                                                               "total_tokens": n + 5}}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})


class ScriptedServer:
    def __init__(self) -> None:
        app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                Route("/v1/chat/completions", completions, methods=["POST"]),
                                Route("/v1/models", models)])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", backlog=4096, limit_concurrency=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("scripted server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
