"""Does tokenfab bench measure what guidellm measures? Same endpoint, same load, alternating runs.

Against a running tokenfab server (`make serve`), closed loop at 4 concurrent streams, 32 requests of
128 prompt / 64 output tokens per run, ABAB (medians of --reps runs each). Compared: TTFT mean and
median, guidellm's ITL (its (E2E - TTFT)/(n - 1), i.e. our TPOT) mean and median, output tok/s.
guidellm is benchmark-only (a separate venv, never a dependency): pass its executable and a folder
holding the model's tokenizer.json (`--processor`).

    python benchmarks/bench_agreement.py --guidellm /path/to/venv/bin/guidellm --processor DIR --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenfab.bench.load import Endpoint, LoadSpec, run_load
from tokenfab.bench.metrics import summarize
from tokenfab.bench.workload import WorkloadSpec, build
from tokenfab.engine.tokenizer import load_tokenizer

MODEL = "smollm2-135m-instruct"


def ours(url: str, n: int, conc: int, seed: int) -> dict[str, float]:
    jobs = build(WorkloadSpec(num_jobs=n, input_len="128", output_len="64", api="completion", seed=seed),
                 load_tokenizer(None))
    s = summarize(asyncio.run(run_load(Endpoint(url + "/v1", MODEL, ignore_eos=True), jobs,
                                       LoadSpec(concurrency=conc))))
    return {"ttft_mean_ms": s["ttft_ms"]["mean"], "ttft_median_ms": s["ttft_ms"]["p50"],
            "tpot_mean_ms": s["tpot_ms"]["mean"], "tpot_median_ms": s["tpot_ms"]["p50"],
            "output_tok_s": s["output_tok_s"], "output_tokens": s["output_tokens"]}


def guidellm(exe: str, processor: str, url: str, n: int, conc: int) -> dict[str, float]:
    out = Path(tempfile.mkdtemp()) / "gl.json"
    cmd = [exe, "benchmark", "run", "--target", url, "--model", MODEL, "--processor", processor,
           "--data", "prompt_tokens=128,output_tokens=64", "--rate-type", "concurrent", "--rate", str(conc),
           "--max-requests", str(n), "--output-path", str(out), "--disable-progress", "--disable-console-outputs"]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, timeout=900)
    b = json.loads(out.read_text())["benchmarks"][0]
    m = b["metrics"]

    def g(k: str, stat: str) -> float:
        return m[k]["successful"][stat]

    tokens = g("output_token_count", "mean") * g("output_token_count", "count")
    return {"ttft_mean_ms": g("time_to_first_token_ms", "mean"), "ttft_median_ms": g("time_to_first_token_ms", "median"),
            "tpot_mean_ms": g("inter_token_latency_ms", "mean"), "tpot_median_ms": g("inter_token_latency_ms", "median"),
            "output_tok_s": tokens / b["duration"], "output_tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guidellm", required=True)
    ap.add_argument("--processor", required=True, help="folder with tokenizer.json + tokenizer_config.json")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"tokenfab bench": [], "guidellm": []}
    for rep in range(args.reps):
        runs["tokenfab bench"].append(ours(args.url, args.requests, args.concurrency, rep))
        runs["guidellm"].append(guidellm(args.guidellm, args.processor, args.url, args.requests, args.concurrency))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    print("| metric | tokenfab bench | guidellm | difference |")
    print("|---|---|---|---|")
    for m in med["guidellm"]:
        a, b = med["tokenfab bench"][m], med["guidellm"][m]
        print(f"| {m} | {a:,.1f} | {b:,.1f} | {(a - b) / b:+.1%} |")
    print(json.dumps({"runs": runs, "command": "python " + " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
