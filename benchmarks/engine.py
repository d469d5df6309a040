"""Engine benchmark: tokenfab's embedded engine vs llama.cpp's llama-server on the same GGUF, side by side.

Measures, over real HTTP on loopback, for each server in turn (ABAB... for --reps > 1, medians):
  * decode throughput at 1, 16 and 64 concurrent streams (64 output tokens each, ignore_eos),
    as output tok/s (all output tokens / wall time) and tok/s per user (1 / TPOT, median);
  * TTFT for ~128, ~512 and ~2048-token prompts (token-id prompts, unique per run, so no prefix cache);
  * peak RSS of the server process.
Decode is reported two ways: end to end (all output tokens / wall time, prefill of the prompts
included) and steady state (tokens produced while every stream is past its first token and none has
finished / that window), which is the rate the matmul-only bound describes.
In the same run it measures the machine's matmul-only bound for SmolLM2-135M's shapes (30 layers +
LM head, bf16 twice: F.linear on plain weights, the issue's bound, and on weights pre-packed for
oneDNN, as the engine's dense path runs them; and at 1 sequence the weight-only kernels the engine
uses there: int4 layers + int8 LM head, and int8 throughout) and reports the engine as a fraction
of each. The bound is measured with
the same allocator setting the engine uses (tokenfab.engine.cpu_memory), so neither side pays page
faults the other does not.

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

import aiohttp
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
class MatmulBound:
    """SmolLM2-135M's matmuls alone (30 layers of fused QKV, O, fused gate-up and down, plus the LM head)."""

    def __init__(self, threads: int) -> None:
        import torch

        from tokenfab.engine.cpu_memory import keep_freed_memory
        from tokenfab.engine.model import INT4_GROUP, _as_int4_groups

        keep_freed_memory()
        torch.set_num_threads(threads)
        self.torch, self.group = torch, INT4_GROUP
        d, f, q, kv, vocab, layers = 576, 1536, 576, 192, 49152, 30
        shapes = [(q + 2 * kv, d), (d, q), (2 * f, d), (d, f)]
        g = torch.Generator().manual_seed(0)
        # distinct weights per layer, as in the model: reusing one layer's would keep them hot in cache
        self.ws = [torch.randn(o, i, generator=g).to(torch.bfloat16) for _ in range(layers) for o, i in shapes]
        self.head = torch.randn(vocab, d, generator=g).to(torch.bfloat16)
        self.d = d

        def quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = w.float().abs().amax(1) / 127
            return torch.round(w.float() / s[:, None]).to(torch.int8), s.to(torch.bfloat16)

        def quant4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # put the random weights on a Q4_1-style grid (min and max of each block of 32 as end levels)
            n, k = w.shape
            grp = w.float().view(n, k // INT4_GROUP, INT4_GROUP)
            lo, hi = grp.amin(-1, keepdim=True), grp.amax(-1, keepdim=True)
            on_grid = (torch.round((grp - lo) / (hi - lo) * 15) * (hi - lo) / 15 + lo).view(n, k)
            q, sz = _as_int4_groups(on_grid.to(torch.bfloat16))
            return torch._convert_weight_to_int4pack_for_cpu(q, 1), sz

        # bf16 weights pre-packed once into oneDNN's blocked layout (as the engine's dense path holds them)
        self.wp = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in self.ws]
        self.headp = torch.ops.mkldnn._reorder_linear_weight(self.head, 64)
        self.wq = [quant(w) for w in self.ws]
        self.w4 = [quant4(w) for w in self.ws]
        self.headq = quant(self.head)
        self._x: dict[int, tuple[dict, object]] = {}

    def step(self, m: int, kernel: str) -> float:
        """Seconds for one step of `m` tokens: bf16 dense ("bf16": F.linear on plain weights, "bf16p": oneDNN
        on weights pre-packed once), or weight-only int8 / int4 layers (int8 LM head)."""
        torch = self.torch
        if m not in self._x:
            self._x[m] = ({i: torch.randn(m, i).to(torch.bfloat16) for i in {w.shape[1] for w in self.ws}},
                          torch.randn(m, self.d).to(torch.bfloat16))
        xs, xh = self._x[m]
        t0 = time.perf_counter()
        if kernel == "bf16p":
            lin = torch.ops.mkldnn._linear_pointwise
            for w, p in zip(self.ws, self.wp):
                lin(xs[w.shape[1]], p, None, "none", [], "")
            lin(xh, self.headp, None, "none", [], "")
            return time.perf_counter() - t0
        for w, (w8, s), (p4, sz) in zip(self.ws, self.wq, self.w4):
            x = xs[w.shape[1]]
            if kernel == "int8":
                torch._weight_int8pack_mm(x, w8, s)
            elif kernel == "int4":
                torch._weight_int4pack_mm_for_cpu(x, p4, self.group, sz)
            else:
                torch.nn.functional.linear(x, w)
        if kernel == "bf16":
            torch.nn.functional.linear(xh, self.head)
        else:  # the tied embedding is Q8_0 in the GGUF: the engine runs the LM head as int8
            torch._weight_int8pack_mm(xh, *self.headq)
        return time.perf_counter() - t0

    def median(self, m: int, kernel: str, reps: int = 20) -> float:
        for _ in range(5):
            self.step(m, kernel)
        return statistics.median(self.step(m, kernel) for _ in range(reps))


def matmul_bound(bound: MatmulBound) -> dict[str, float]:
    out = {}
    for m in DECODE_CONCURRENCY:
        for kernel in ("bf16", "bf16p"):
            s = bound.median(m, kernel)
            out[f"{kernel}_step_ms_{m}"] = s * 1000
            out[f"{kernel}_tok_s_{m}"] = m / s
    for kernel in ("int8", "int4"):
        s = bound.median(1, kernel)
        out[f"{kernel}_step_ms_1"] = s * 1000
        out[f"{kernel}_tok_s_1"] = 1 / s
    return out


def engine_in_process(threads: int, bound: MatmulBound) -> dict[str, float]:
    """The engine alone (no HTTP, no load generator sharing the cores), with the bound interleaved.

    End to end: output tokens / wall time of `generate`-style runs. Steady state: engine decode steps
    while every stream is decoding; after each such step one matmul-only step of the same size runs,
    so the fraction engine / bound compares steps taken moments apart (this machine's speed drifts
    by +-20% within minutes).
    """
    from tokenfab.engine import EngineConfig, SamplingParams
    from tokenfab.engine.llm_engine import LLMEngine

    eng = LLMEngine(EngineConfig(threads=threads))
    prompt = eng.tokenizer.encode("Once upon a time, in a village by the sea, there lived")
    sp = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    eng.generate([prompt] * 4, sp)
    out = {}
    for n in DECODE_CONCURRENCY:
        kernels = ("bf16", "bf16p", "int4") if n == 1 else ("bf16", "bf16p")
        t0 = time.perf_counter()
        rids = {eng.add_request(prompt + [1000 + i], sp) for i in range(n)}
        started: set[str] = set()
        steps: list[float] = []
        bsteps: dict[str, list[float]] = {k: [] for k in kernels}
        e2e_pause = 0.0  # time spent in interleaved bound steps, taken out of the end-to-end figure
        while eng.has_work():
            ts = time.perf_counter()
            outs = eng.step()
            dt = time.perf_counter() - ts
            steady = started == rids and not any(o.finished for o in outs)
            started.update(o.request_id for o in outs)
            if steady and len(outs) == n:
                steps.append(dt)
                tb = time.perf_counter()
                for k in kernels:
                    bsteps[k].append(bound.step(n, k))
                e2e_pause += time.perf_counter() - tb
        out[f"output_tok_s_{n}"] = n * OUTPUT_TOKENS / (time.perf_counter() - t0 - e2e_pause)
        step = statistics.median(steps)
        out[f"decode_tok_s_{n}"] = n / step
        out[f"step_ms_{n}"] = step * 1000
        for k in kernels:
            b = statistics.median(bsteps[k])
            out[f"bound_{k}_step_ms_{n}"] = b * 1000
            out[f"fraction_of_{k}_bound_{n}"] = b / step
    return out


# --- load against one server -----------------------------------------------------------------------------
async def stream_one(session: aiohttp.ClientSession, url: str, model: str, prompt, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    times: list[float] = []
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.read())[:300]!r}")
        # light parsing: the client shares the CPU with the server, so only the usage chunk is decoded
        async for raw in r.content:
            if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                continue
            if b'"usage":{' in raw or b'"usage": {' in raw:
                usage = json.loads(raw[6:]).get("usage") or usage
            if b'"text":""' not in raw and b'"text": ""' not in raw and b'"text"' in raw:
                chunks += 1
                times.append(time.perf_counter())
                if first is None:
                    first = times[-1]
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else chunks
    return {"start": t0, "ttft_s": (first or end) - t0, "e2e_s": end - t0, "end": end, "output_tokens": n,
            "prompt_tokens": usage["prompt_tokens"] if usage else None, "chunk_times": times}


def _session() -> aiohttp.ClientSession:
    # aiohttp rather than httpx: the load generator shares the two cores with the server, and aiohttp
    # spends about a third of the client CPU per streamed token here (see docs/performance.md)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=600))


async def decode_load(url: str, model: str, n: int, rng: random.Random) -> dict:
    prompts = [f"Story {rng.randrange(10**9)}: once upon a time, in a village by the sea, there lived" for _ in range(n)]
    cpu0 = time.process_time()
    async with _session() as session:
        res = await asyncio.gather(*(stream_one(session, url, model, p, OUTPUT_TOKENS) for p in prompts))
    client_cpu = time.process_time() - cpu0
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    total = sum(r["output_tokens"] for r in res)
    tpots = [(r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in res if r["output_tokens"] > 1]
    # steady state: from the moment the last stream got its first chunk to the moment the first one ended
    t_a = max(r["chunk_times"][0] for r in res)
    t_b = min(r["chunk_times"][-1] for r in res)
    in_window = sum(1 for r in res for t in r["chunk_times"] if t_a < t <= t_b)
    return {"output_tok_s": total / wall, "tok_s_per_user": 1 / statistics.median(tpots), "output_tokens": total,
            "decode_tok_s": in_window / (t_b - t_a) if t_b > t_a else float("nan"),
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in res), "client_cpu_s": client_cpu, "wall_s": wall}


async def ttft(url: str, model: str, n_tokens: int, rng: random.Random) -> float:
    prompt = [rng.randrange(1000, 40000) for _ in range(n_tokens)]
    async with _session() as session:
        r = await stream_one(session, url, model, prompt, 1)
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
    mb = MatmulBound(args.threads)
    bound = matmul_bound(mb)
    print("measuring the engine in-process, the bound interleaved ...", flush=True)
    in_proc = engine_in_process(args.threads, mb)
    del mb
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

    from tokenfab.engine import cpu_kernels

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "torch": torch.__version__, "threads": args.threads, "reps": args.reps,
        "cpu_kernels": cpu_kernels.describe(),
        "command": "python " + " ".join(sys.argv),
        "precision": {"tokenfab": "bf16 activations; for steps of <= 12 tokens weight-only matmuls on the GGUF's own "
                                  "4-bit weights (int4, Q4_1 groups of 32, not re-rounded) and an int8 LM head "
                                  "(the Q8_0 embedding rounded per channel); bf16 matmuls on the same weights above (pre-packed for "
                                  "oneDNN); "
                                  "decode attention, norms, RoPE and SiLU in the built CPU kernels "
                                  "(fp32 inside, bf16 out) where they build",
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
        lines.append(row(f"steady decode tok/s, {n} streams", t[f"decode_{n}"]["decode_tok_s"],
                         l and l[f"decode_{n}"]["decode_tok_s"]))
        lines.append(row(f"tok/s per user, {n} streams", t[f"decode_{n}"]["tok_s_per_user"],
                         l and l[f"decode_{n}"]["tok_s_per_user"]))
    for n in TTFT_PROMPTS:
        lines.append(row(f"TTFT {n}-token prompt (s)", t[f"ttft_{n}_s"], l and l[f"ttft_{n}_s"], "{:.3f}", False))
    lines.append(row("peak RSS (MB)", t["peak_rss_mb"], l and l["peak_rss_mb"], "{:.0f}", False))
    lines.append("")
    lines.append("In process, steady decode, each engine step followed by matmul-only steps of the same size "
                 "(bf16: F.linear on plain weights, the issue's bound; bf16p: the same matmuls on weights pre-packed "
                 "for oneDNN, as the engine runs them):")
    lines.append("| streams | engine step | matmul-only step bf16 / bf16p | fraction of the bf16 bound | "
                 "fraction of the bf16p bound | engine tok/s steady / end to end |")
    lines.append("|---|---|---|---|---|---|")
    for n in DECODE_CONCURRENCY:
        lines.append(f"| {n} | {in_proc[f'step_ms_{n}']:.1f} ms | {in_proc[f'bound_bf16_step_ms_{n}']:.1f} / "
                     f"{in_proc[f'bound_bf16p_step_ms_{n}']:.1f} ms | {in_proc[f'fraction_of_bf16_bound_{n}']:.2f} | "
                     f"{in_proc[f'fraction_of_bf16p_bound_{n}']:.2f} | {in_proc[f'decode_tok_s_{n}']:.0f} / "
                     f"{in_proc[f'output_tok_s_{n}']:.0f} |")
    lines.append(f"At 1 stream the int4 weight-only matmuls alone take {in_proc['bound_int4_step_ms_1']:.1f} ms "
                 f"(the engine step is {in_proc['fraction_of_int4_bound_1']:.2f} of that bound).")
    lines.append("")
    lines.append("Over HTTP (the bound measured separately, before the servers ran):")
    lines.append("| streams | matmul-only bound bf16 / bf16p tok/s | server steady decode tok/s | fraction bf16 / bf16p | "
                 "end to end tok/s |")
    lines.append("|---|---|---|---|---|")
    for n in DECODE_CONCURRENCY:
        b, bp = bound[f"bf16_tok_s_{n}"], bound[f"bf16p_tok_s_{n}"]
        hs, h = t[f"decode_{n}"]["decode_tok_s"], t[f"decode_{n}"]["output_tok_s"]
        lines.append(f"| {n} | {b:.0f} / {bp:.0f} | {hs:.0f} | {hs / b:.2f} / {hs / bp:.2f} | {h:.0f} |")
    for k in ("int4", "int8"):
        lines.append(f"{k} weight-only matmul-only bound at 1 stream ({k} layers, int8 LM head): "
                     f"{bound[f'{k}_tok_s_1']:.0f} tok/s ({bound[f'{k}_step_ms_1']:.1f} ms/step)")
    print("\n".join(lines))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
