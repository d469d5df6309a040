"""Engine benchmark: tokenfab's embedded engine vs llama.cpp's llama-server on the same GGUF, side by side.

Measures, over real HTTP on loopback, for each server in turn (ABAB... for --reps > 1, medians):
  * decode throughput at 1, 16 and 64 concurrent streams (64 output tokens each, ignore_eos),
    as output tok/s (all output tokens / wall time) and tok/s per user (1 / TPOT, median);
  * TTFT for ~128, ~512 and ~2048-token prompts (token-id prompts, unique per run, so no prefix cache);
  * peak RSS of the server process.
In the same run it measures the machine's matmul-only bound for SmolLM2-135M's shapes (30 layers +
LM head, bf16, and int8 weight-only at 1 sequence) and reports the engine as a fraction of it.

    python benchmarks/engine.py [--llama-server PATH] [--reps 2] [--threads 2]

llama-server is optional (benchmark-only, never a dependency): build it from the llama.cpp sources
vendored in the llama-cpp-python sdist (see docs/performance.md) and pass --llama-server or set
LLAMA_SERVER. Results: a table on stdout and JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DECODE_CONCURRENCY = (1, 16, 64)
TTFT_PROMPTS = (128, 512, 2048)
OUTPUT_TOKENS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# --- matmul-only bound ---------------------------------------------------------------------------------
def matmul_bound(threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    d, f, q, kv, vocab, layers = 576, 1536, 576, 192, 49152, 30
    shapes = [(q + 2 * kv, d), (d, q), (2 * f, d), (d, f)]
    g = torch.Generator().manual_seed(0)
    # distinct weights per layer, as in the model: reusing one layer's would keep them hot in cache
    ws = [torch.randn(o, i, generator=g).to(torch.bfloat16) for _ in range(layers) for o, i in shapes]
    head = torch.randn(vocab, d, generator=g).to(torch.bfloat16)

    def quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = w.float().abs().amax(1) / 127
        return torch.round(w.float() / s[:, None]).to(torch.int8), s.to(torch.bfloat16)

    wq = [quant(w) for w in ws]
    headq = quant(head)

    def step(m: int, int8: bool) -> float:
        xs = {i: torch.randn(m, i).to(torch.bfloat16) for i in {w.shape[1] for w in ws}}
        xh = torch.randn(m, d).to(torch.bfloat16)
        times = []
        for it in range(25):
            t0 = time.perf_counter()
            for w, (w8, s) in zip(ws, wq):
                x = xs[w.shape[1]]
                if int8:
                    torch._weight_int8pack_mm(x, w8, s)
                else:
                    torch.nn.functional.linear(x, w)
            if int8:
                torch._weight_int8pack_mm(xh, *headq)
            else:
                torch.nn.functional.linear(xh, head)
            if it >= 5:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out = {}
    for m in DECODE_CONCURRENCY:
        s = step(m, False)
        out[f"bf16_step_ms_{m}"] = s * 1000
        out[f"bf16_tok_s_{m}"] = m / s
    s = step(1, True)
    out["int8_step_ms_1"] = s * 1000
    out["int8_tok_s_1"] = 1 / s
    return out


def engine_in_process(threads: int) -> dict[str, float]:
    """Decode tok/s of the engine alone (no HTTP, no load generator sharing the cores)."""
    from tokenfab.engine import EngineConfig, SamplingParams
    from tokenfab.engine.llm_engine import LLMEngine

    eng = LLMEngine(EngineConfig(threads=threads))
    prompt = eng.tokenizer.encode("Once upon a time, in a village by the sea, there lived")
    sp = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    eng.generate([prompt] * 4, sp)
    out = {}
    for n in DECODE_CONCURRENCY:
        t0 = time.perf_counter()
        eng.generate([prompt + [1000 + i] for i in range(n)], sp)
        out[f"output_tok_s_{n}"] = n * OUTPUT_TOKENS / (time.perf_counter() - t0)
    return out


# --- load against one server -----------------------------------------------------------------------------
async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        # light parsing: the client shares the CPU with the server, so only the usage chunk is decoded
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if '"usage":{' in line or '"usage": {' in line:
                usage = json.loads(line[6:]).get("usage") or usage
            if '"text":""' not in line and '"text": ""' not in line and '"text"' in line:
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else chunks
    return {"start": t0, "ttft_s": (first or end) - t0, "e2e_s": end - t0, "end": end, "output_tokens": n,
            "prompt_tokens": usage["prompt_tokens"] if usage else None}


async def decode_load(url: str, model: str, n: int, rng: random.Random) -> dict:
    prompts = [f"Story {rng.randrange(10**9)}: once upon a time, in a village by the sea, there lived" for _ in range(n)]
    cpu0 = time.process_time()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        res = await asyncio.gather(*(stream_one(client, url, model, p, OUTPUT_TOKENS) for p in prompts))
    client_cpu = time.process_time() - cpu0
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    total = sum(r["output_tokens"] for r in res)
    tpots = [(r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in res if r["output_tokens"] > 1]
    return {"output_tok_s": total / wall, "tok_s_per_user": 1 / statistics.median(tpots), "output_tokens": total,
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in res), "client_cpu_s": client_cpu, "wall_s": wall}


async def ttft(url: str, model: str, n_tokens: int, rng: random.Random) -> float:
    prompt = [rng.randrange(1000, 40000) for _ in range(n_tokens)]
    async with httpx.AsyncClient(timeout=600) as client:
        r = await stream_one(client, url, model, prompt, 1)
    return r["ttft_s"]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def run_server(kind: str, cmd: list[str], port: int, model: str, rng: random.Random) -> dict:
    url = f"http://127.0.0.1:{port}"
    log = open(ROOT / "benchmarks" / "results" / f".{kind}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_ready(url, proc)
        asyncio.run(decode_load(url, model, 4, rng))  # warm-up
        out: dict = {}
        for n in DECODE_CONCURRENCY:
            out[f"decode_{n}"] = asyncio.run(decode_load(url, model, n, rng))
        for n in TTFT_PROMPTS:
            out[f"ttft_{n}_s"] = asyncio.run(ttft(url, model, n, rng))
        out["peak_rss_mb"] = peak_rss_mb(proc.pid)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def median_runs(runs: list[dict]) -> dict:
    out: dict = {}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = median_runs([r[k] for r in runs])
        else:
            out[k] = statistics.median(r[k] for r in runs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="path to llama.cpp's llama-server")
    ap.add_argument("--reps", type=int, default=2, help="alternating runs per server; medians are reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/engine-DATE.json)")
    ap.add_argument("--engine-args", default="", help="extra flags for `tokenfab serve`")
    args = ap.parse_args()

    from tokenfab.engine.loader import bundled_gguf_path

    gguf = bundled_gguf_path()
    if gguf is None:
        print("benchmarks/engine.py: the bundled model is not installed (make install)", file=sys.stderr)
        return 2
    if args.llama_server and not Path(args.llama_server).is_file():
        print(f"benchmarks/engine.py: --llama-server {args.llama_server} does not exist", file=sys.stderr)
        return 2
    rng = random.Random(0)
    print("measuring the matmul-only bound ...", flush=True)
    bound = matmul_bound(args.threads)
    print("measuring the engine in-process ...", flush=True)
    in_proc = engine_in_process(args.threads)
    servers: dict[str, list[str]] = {}
    port = free_port()
    servers["tokenfab"] = [sys.executable, "-m", "tokenfab.cli", "serve", "--port", str(port), "--threads",
                           str(args.threads), "--log-level", "warning", *args.engine_args.split()]
    ports = {"tokenfab": port}
    if args.llama_server:
        lp = free_port()
        ports["llama-server"] = lp
        slots = max(DECODE_CONCURRENCY)
        servers["llama-server"] = [args.llama_server, "-m", str(gguf), "--port", str(lp), "-t", str(args.threads),
                                   "-np", str(slots), "-c", str(slots * 2304), "--log-disable"]
    runs: dict[str, list[dict]] = {k: [] for k in servers}
    for rep in range(args.reps):
        for kind, cmd in servers.items():
            print(f"rep {rep + 1}/{args.reps}: {kind} ...", flush=True)
            runs[kind].append(run_server(kind, cmd, ports[kind], "smollm2-135m-instruct", rng))
    res = {k: median_runs(v) for k, v in runs.items()}

    import torch

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "torch": torch.__version__, "threads": args.threads, "reps": args.reps,
        "command": "python " + " ".join(sys.argv),
        "precision": {"tokenfab": "bf16 activations; int8 weight-only matmuls for steps of <= 8 tokens, bf16 above; "
                                  "weights dequantised from the GGUF's Q4_1",
                      "llama-server": "Q4_1 weights as stored in the GGUF (ggml CPU kernels)"},
    }
    report = {"meta": meta, "matmul_bound": bound, "engine_in_process": in_proc, "results": res}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"engine-{dt.date.today()}.json"
    out.write_text(json.dumps(report, indent=2))

    t, l = res["tokenfab"], res.get("llama-server")

    def row(name: str, a: float, b: float | None, fmt: str = "{:.1f}", higher_better: bool = True) -> str:
        ratio = "" if b is None else f"{(a / b if higher_better else b / a):.2f}x"
        bs = "" if b is None else fmt.format(b)
        return f"| {name} | {fmt.format(a)} | {bs} | {ratio} |"

    lines = [f"machine: {meta['machine']}; torch {meta['torch']}, {args.threads} threads; {meta['date']}",
             "| metric | tokenfab | llama-server | tokenfab advantage |", "|---|---|---|---|"]
    for n in DECODE_CONCURRENCY:
        lines.append(row(f"output tok/s, {n} streams", t[f"decode_{n}"]["output_tok_s"],
                         l and l[f"decode_{n}"]["output_tok_s"]))
        lines.append(row(f"tok/s per user, {n} streams", t[f"decode_{n}"]["tok_s_per_user"],
                         l and l[f"decode_{n}"]["tok_s_per_user"]))
    for n in TTFT_PROMPTS:
        lines.append(row(f"TTFT {n}-token prompt (s)", t[f"ttft_{n}_s"], l and l[f"ttft_{n}_s"], "{:.3f}", False))
    lines.append(row("peak RSS (MB)", t["peak_rss_mb"], l and l["peak_rss_mb"], "{:.0f}", False))
    lines.append("")
    lines.append("| streams | matmul-only bound (bf16) tok/s | engine in-process tok/s | fraction | "
                 "server over HTTP tok/s | fraction |")
    lines.append("|---|---|---|---|---|---|")
    for n in DECODE_CONCURRENCY:
        b = bound[f"bf16_tok_s_{n}"]
        e, h = in_proc[f"output_tok_s_{n}"], t[f"decode_{n}"]["output_tok_s"]
        lines.append(f"| {n} | {b:.0f} | {e:.0f} | {e / b:.2f} | {h:.0f} | {h / b:.2f} |")
    lines.append(f"int8 weight-only matmul-only bound at 1 stream: {bound['int8_tok_s_1']:.0f} tok/s "
                 f"({bound['int8_step_ms_1']:.1f} ms/step)")
    print("\n".join(lines))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
