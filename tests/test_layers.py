"""The layers stay apart: the gateway reaches engines only through the Backend seam, and the pure
layers (and every CLI verb but `serve`) run without PyTorch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tokenfab"

# Run with torch made unimportable: any module that reaches for it fails the script.
NO_TORCH = r"""
import sys
sys.modules["torch"] = None
import tokenfab.backends.base, tokenfab.bench.run, tokenfab.cli, tokenfab.config, tokenfab.curve
import tokenfab.economics.claims, tokenfab.economics.planner, tokenfab.economics.report, tokenfab.generation
import tokenfab.ledger.keeper, tokenfab.ledger.store, tokenfab.meter.energy, tokenfab.meter.metrics
import tokenfab.perf.calibrate, tokenfab.perf.model, tokenfab.serve.admission, tokenfab.serve.app
import tokenfab.serve.body, tokenfab.serve.openapi, tokenfab.step_model, tokenfab.tokenizer, tokenfab.worker
import tokenfab.backends.openai, tokenfab.fleet.build, tokenfab.fleet.fleet, tokenfab.fleet.router
import tokenfab.fleet.prefix_index, tokenfab.fleet.workers
from tokenfab.cli import main
assert main(["curve", "--hardware", "B200", "--model", "Llama-3.3-70B"]) == 0
assert main(["serve", "--port", "not-a-port"]) == 2
from tokenfab.config import FleetConfig, LedgerConfig, Settings
from tokenfab.serve.app import create_server
app, fleet, ledger = create_server(Settings(  # a gateway over other engines needs no torch
    fleet=FleetConfig(backends="http://127.0.0.1:9/v1", upstream_model="m"),
    ledger=LedgerConfig(ledger_url="sqlite:///:memory:")))
assert fleet.info.name == "m" and not fleet.members[0].backend.healthy
print("no torch needed")
"""


def test_pure_layers_and_the_cli_run_without_torch():
    r = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "no torch needed" in r.stdout, r.stderr[-3000:]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_only_the_embedded_backend_imports_the_engine():
    serve_side = [*(SRC / "serve").glob("*.py"), *(SRC / "backends").glob("*.py"), SRC / "generation.py",
                  SRC / "step_model.py", *(SRC / "ledger").glob("*.py"), *(SRC / "meter").glob("*.py"),
                  *(SRC / "fleet").glob("*.py"), SRC / "worker.py", SRC / "tokenizer.py"]
    reaching = {p.relative_to(SRC).as_posix() for p in serve_side
                if any(m == "tokenfab.engine" or m.startswith("tokenfab.engine.") for m in _imports(p))}
    assert reaching == {"backends/embedded.py"}
