"""What the gateway adds: the same fast scripted backend direct, through `tokenfab serve --backends`, and
through LiteLLM's proxy, each proxy pinned to a core of its own.

The backend is a minimal asyncio HTTP/1.1 server (pinned with the client to the other core) that
answers `/v1/completions` at once: `--tokens` tokens as one JSON body, or as SSE chunks and a usage
chunk. For each path, plain and streaming:
- latency: `--sequential` requests one at a time; the added latency is each path's per-request
  time less the direct path's (p50 and p99 of the path, minus the direct p50 and p99);
- throughput: `--concurrency` requests kept in flight for `--seconds`; requests/s completed.
tokenfab runs as it ships, with the ledger on (SQLite in a temporary folder, anonymous tier: a
reservation and a usage record per request). LiteLLM is benchmark-only, never a dependency: give
its executable with `--litellm` (e.g. from `python -m venv /tmp/ll && /tmp/ll/bin/pip install
'litellm[proxy]'`); without it that column is left out.

    python benchmarks/gateway_overhead.py [--litellm /tmp/ll/bin/litellm] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
MODEL = "scripted"
LITELLM: set[str] = set()  # URLs that take the master key


# --- the scripted backend -------------------------------------------------------------------------
def _response(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tokens: int) -> None:
    models = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm",
                                                     "max_model_len": 4096}]}).encode()
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for ln in lines[1:]:
                if ln.lower().startswith("content-length:"):
                    length = int(ln.split(":", 1)[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            if path.endswith("/models"):
                writer.write(_response("200 OK", models))
            elif path == "/health" or path == "/metrics":
                writer.write(_response("200 OK", b"", "text/plain"))
            elif body.get("stream"):
                chunks = [json.dumps({"id": "x", "object": "text_completion", "model": MODEL, "choices": [
                    {"index": 0, "text": " tok", "finish_reason": "length" if i == tokens - 1 else None}]})
                    for i in range(tokens)]
                chunks.append(json.dumps({"id": "x", "object": "text_completion", "model": MODEL, "choices": [],
                                          "usage": {"prompt_tokens": 8, "completion_tokens": tokens,
                                                    "total_tokens": 8 + tokens}}))
                sse = "".join(f"data: {c}\n\n" for c in chunks) + "data: [DONE]\n\n"
                payload = sse.encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                             + f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n")
            else:
                obj = {"id": "x", "object": "text_completion", "model": MODEL,
                       "choices": [{"index": 0, "text": " tok" * tokens, "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}}
                writer.write(_response("200 OK", json.dumps(obj).encode()))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve_backend(port: int, tokens: int) -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _handle(r, w, tokens), "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --- the client -----------------------------------------------------------------------------------
MASTER_KEY = "sk-benchmark-only-not-a-secret"  # LiteLLM refuses to start without one (checked in memory)


async def _one(session: aiohttp.ClientSession, url: str, stream: bool, tokens: int) -> float:
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": tokens, "stream": stream}
    t = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body,
                            headers={"Authorization": f"Bearer {MASTER_KEY}"} if url in LITELLM else None) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {(await r.text())[:300]}")
        await r.read()
    return time.perf_counter() - t


async def measure(url: str, stream: bool, tokens: int, sequential: int, concurrency: int, seconds: float) -> dict:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        for _ in range(20):  # warm up
            await _one(session, url, stream, tokens)
        lat = [await _one(session, url, stream, tokens) for _ in range(sequential)]
        done = 0
        stop = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await _one(session, url, stream, tokens)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        rps = done / (time.perf_counter() - t0)
    s = sorted(lat)
    return {"p50_ms": statistics.median(lat) * 1000, "p99_ms": s[int(0.99 * (len(s) - 1))] * 1000, "rps": rps}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited ({proc.returncode})")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} was not ready in {timeout:.0f} s")


def ledger_write_ms(folder: str, n: int = 300) -> dict:
    """The two durable ledger writes a request makes (reservation, usage record), timed alone, one at a time."""
    sys.path.insert(0, str(ROOT / "src"))
    from tokenfab.ledger.store import Ledger, UsageRecord

    led = Ledger(f"sqlite:///{folder}/alone.db")
    led.ensure_tenant("anonymous")
    t0 = time.perf_counter()
    for i in range(n):
        led.reserve(f"r{i}", "anonymous", "free", MODEL, 0.0, 8)
    t1 = time.perf_counter()
    for i in range(n):
        led.settle(UsageRecord(request_id=f"r{i}", tenant="anonymous", tier="free", model=MODEL, status="completed",
                               prompt_tokens=8, completion_tokens=16))
    t2 = time.perf_counter()
    led.close()
    return {"reserve_ms": (t1 - t0) / n * 1000, "settle_ms": (t2 - t1) / n * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--litellm", default=None, help="the litellm executable of a separate venv")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    client_cpu, proxy_cpu = {0}, {1 % ncpu}
    os.sched_setaffinity(0, client_cpu)
    bport = free_port()
    import multiprocessing as mp

    backend = mp.Process(target=serve_backend, args=(bport, args.tokens), daemon=True)
    backend.start()
    os.sched_setaffinity(backend.pid, client_cpu)
    direct = f"http://127.0.0.1:{bport}"
    wait_http(direct + "/health", None)
    procs: list[subprocess.Popen] = []
    paths = {"direct": direct}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tport = free_port()
            tf = subprocess.Popen(
                [sys.executable, "-m", "tokenfab.cli", "serve", "--port", str(tport), "--backends", direct + "/v1",
                 "--ledger-url", f"sqlite:///{tmp}/ledger.db", "--log-level", "warning",
                 "--max-waiting", "100000", "--tier-queue-limit", "100000"],
                stdout=open(f"{tmp}/tokenfab.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
            procs.append(tf)
            os.sched_setaffinity(tf.pid, proxy_cpu)
            wait_http(f"http://127.0.0.1:{tport}/health", tf)
            paths["tokenfab"] = f"http://127.0.0.1:{tport}"
            if args.litellm:
                lport = free_port()
                ll = subprocess.Popen([args.litellm, "--model", f"openai/{MODEL}", "--api_base", direct + "/v1",
                                       "--host", "127.0.0.1", "--port", str(lport), "--num_workers", "1"],
                                      stdout=open(f"{tmp}/litellm.log", "w"), stderr=subprocess.STDOUT,
                                      env={**os.environ, "OPENAI_API_KEY": "x", "LITELLM_LOG": "ERROR",
                                           "LITELLM_MASTER_KEY": MASTER_KEY})
                procs.append(ll)
                os.sched_setaffinity(ll.pid, proxy_cpu)
                wait_http(f"http://127.0.0.1:{lport}/health/liveliness", ll, timeout=300)
                paths["litellm"] = f"http://127.0.0.1:{lport}"
                LITELLM.add(paths["litellm"])
            results: dict = {}
            for stream in (False, True):
                mode = "streaming" if stream else "plain"
                for name, url in paths.items():
                    r = asyncio.run(measure(url, stream, args.tokens, args.sequential, args.concurrency, args.seconds))
                    results.setdefault(mode, {})[name] = r
                    base = results[mode]["direct"]
                    r["added_p50_ms"] = r["p50_ms"] - base["p50_ms"]
                    r["added_p99_ms"] = r["p99_ms"] - base["p99_ms"]
                    print(f"{mode:>9} {name:>8}: p50 {r['p50_ms']:.2f} ms (+{r['added_p50_ms']:.2f}), "
                          f"p99 {r['p99_ms']:.2f} ms (+{r['added_p99_ms']:.2f}), {r['rps']:.0f} req/s", flush=True)
            results["ledger_alone"] = ledger_write_ms(tmp)
            print(f"ledger writes alone: reserve {results['ledger_alone']['reserve_ms']:.2f} ms, "
                  f"settle {results['ledger_alone']['settle_ms']:.2f} ms", flush=True)
        finally:
            for p in procs:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            backend.terminate()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    out = {"machine": f"{cpu}, {ncpu} cores", "date": dt.date.today().isoformat(), "command": " ".join(sys.argv),
           "args": vars(args), "results": results}
    dest = Path(args.out or ROOT / "benchmarks" / "results" / f"gateway-overhead-{out['date']}.json")
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
