"""The engine in process with its CPU kernels on and off, alternating, each as a fraction of the bound.

    python benchmarks/engine_ab.py [--reps 2] [--threads 2]

Runs `engine_in_process` of benchmarks/engine.py (1, 16 and 64 streams, steady-state decode steps,
each followed by matmul-only steps of the same size) with the CPU kernels of
`tokenfab.engine.cpu_kernels` in use, then with the torch ops that do the same work, ABAB. Everything
else (pre-packed matmuls, int4 small batches, the scheduler) is the same on both sides.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import engine as bench  # benchmarks/engine.py

    from tokenfab.engine import cpu_kernels

    if not cpu_kernels.available():
        print(f"benchmarks/engine_ab.py: the CPU kernels are not built here ({cpu_kernels.describe()})", file=sys.stderr)
        return 2
    built = cpu_kernels.supports
    bound = bench.MatmulBound(args.threads)
    runs: dict[str, list[dict]] = {"CPU kernels": [], "torch ops": []}
    for _ in range(args.reps):
        for name in runs:
            # the model and the sampler ask `supports` when they are built and called
            cpu_kernels.supports = built if name == "CPU kernels" else (lambda *a: False)  # type: ignore[assignment]
            runs[name].append(bench.engine_in_process(args.threads, bound))
    cpu_kernels.supports = built  # type: ignore[assignment]
    print(f"CPU: {bench.cpu_model()}; kernels {cpu_kernels.describe()}; medians of {args.reps} runs each, ABAB")
    print("| streams | path | engine step | bf16 bound step | fraction of bf16 | bf16p bound step | fraction of bf16p |")
    print("|---|---|---|---|---|---|---|")
    for n in bench.DECODE_CONCURRENCY:
        for name, rs in runs.items():
            def med(key: str) -> float:
                return statistics.median(r[key] for r in rs)

            print(f"| {n} | {name} | {med(f'step_ms_{n}'):.1f} ms | {med(f'bound_bf16_step_ms_{n}'):.1f} ms | "
                  f"{med(f'fraction_of_bf16_bound_{n}'):.2f} | {med(f'bound_bf16p_step_ms_{n}'):.1f} ms | "
                  f"{med(f'fraction_of_bf16p_bound_{n}'):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
