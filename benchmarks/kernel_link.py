"""What linking the CPU kernels without -ffast-math costs: decode steps with the library linked the
old way (-ffast-math at link time pulls in crtfastmath.o, which turns on flush-to-zero for the whole
process) and the current way (compiled with -ffast-math, linked without), alternating, each in a fresh
process with its own kernel cache.

    python benchmarks/kernel_link.py [--reps 2] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, statistics, sys, time
from tokenfab.engine import cpu_kernels
if sys.argv[1] == "ftz":
    cpu_kernels._LINK = [*cpu_kernels._LINK, "-ffast-math"]  # the old single-step link
from tokenfab.engine import EngineConfig, SamplingParams
from tokenfab.engine.llm_engine import LLMEngine
eng = LLMEngine(EngineConfig())
flushes = (2.2250738585072014e-308 / 2) == 0.0
prompt = eng.tokenizer.encode("Once upon a time, in a village by the sea, there lived")
out = {"flush_to_zero": flushes, "kernels": cpu_kernels.describe()}
for n in (1, 16):
    sp = SamplingParams(max_tokens=int(sys.argv[2]) + 20, temperature=0.0, ignore_eos=True)
    rids = [eng.add_request(prompt + [1000 + i], sp) for i in range(n)]
    steps = []
    while eng.has_work():
        t0 = time.perf_counter(); outs = eng.step(); dt = time.perf_counter() - t0
        if len(outs) == n and not any(o.finished for o in outs) and all(o.completion_tokens > 1 for o in outs):
            steps.append(dt)
    out[f"step_ms_{n}"] = statistics.median(steps) * 1000
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150, help="decode steps per run")
    ns = ap.parse_args()
    caches = {v: tempfile.mkdtemp(prefix=f"tokenfab-kernels-{v}-") for v in ("ftz", "current")}
    runs: dict[str, list[dict]] = {"ftz": [], "current": []}
    for _ in range(ns.reps):
        for variant in runs:
            env = {**os.environ, "TOKENFAB_KERNEL_CACHE": caches[variant]}
            p = subprocess.run([sys.executable, "-c", CHILD, variant, str(ns.steps)], capture_output=True, text=True,
                               env=env, timeout=900)
            if p.returncode != 0:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            runs[variant].append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"kernels: {runs['current'][0]['kernels']}; medians of {ns.reps} runs each, alternating")
    print("| link | flush-to-zero | decode step, 1 stream | decode step, 16 streams |")
    print("|---|---|---|---|")
    for variant, rs in runs.items():
        med = {n: statistics.median(r[f"step_ms_{n}"] for r in rs) for n in (1, 16)}
        print(f"| {'-ffast-math at link (old)' if variant == 'ftz' else 'compile only (current)'} | "
              f"{rs[0]['flush_to_zero']} | {med[1]:.2f} ms | {med[16]:.2f} ms |")
    ratio = {n: statistics.median(r[f"step_ms_{n}"] for r in runs["current"]) /
             statistics.median(r[f"step_ms_{n}"] for r in runs["ftz"]) for n in (1, 16)}
    print(f"current / old step time: {ratio[1]:.3f} (1 stream), {ratio[16]:.3f} (16 streams)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
