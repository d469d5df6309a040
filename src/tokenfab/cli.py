"""`tokenfab` command line: serve (more verbs arrive with their parts). User mistakes: one line, exit 2."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import typing

from tokenfab.config import ConfigError, Settings, all_keys, load_settings


class UsageError(Exception):
    pass


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    for key, (section, f) in all_keys().items():
        typ = f.type
        if typing.get_origin(typ) is not None:
            typ = str
        flag = "--" + key.replace("_", "-")
        help_ = f"{section}.{key} (default {f.default!r}; env TOKENFAB_{key.upper()})"
        if typ is bool:
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=key, default=None, help=help_, metavar=key.upper())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokenfab", description="An open token factory: serve, meter, bench and plan LLM tokens.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server on the embedded engine")
    serve.add_argument("--config", default=None, help="path to tokenfab.yaml (default ./tokenfab.yaml if present)")
    _add_setting_flags(serve)
    worker = sub.add_parser("worker", help="run the embedded engine as a worker process for a gateway to route to")
    worker.add_argument("--config", default=None, help="path to tokenfab.yaml (its engine and tiers are used)")
    _add_setting_flags(worker)
    _add_bench(sub)
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    kc = ksub.add_parser("create", help="create a key (printed once; only its hash is stored)")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--tier", required=True)
    kc.add_argument("--budget-usd", type=float, default=None, help="the tenant's budget (default unlimited)")
    ksub.add_parser("list", help="list keys (never the secrets)")
    kr = ksub.add_parser("revoke", help="revoke a key by its id")
    kr.add_argument("key_id")
    us = sub.add_parser("usage", help="usage records from the ledger")
    us.add_argument("--tenant", default=None)
    us.add_argument("--since", default=None, help="ISO date/time or unix seconds")
    us.add_argument("--format", default="table", choices=["table", "csv", "json"])
    us.add_argument("--limit", type=int, default=None)
    cv = sub.add_parser("curve", help="predict the throughput-interactivity curve of hardware x model")
    cv.add_argument("--hardware", required=True)
    cv.add_argument("--model", required=True)
    cv.add_argument("--precision", default=None, help="fp4 | fp8 | bf16 (default: fp4 where supported, else fp8)")
    cv.add_argument("--isl", type=int, default=1024)
    cv.add_argument("--osl", type=int, default=1024)
    cv.add_argument("--mode", default="aggregated", choices=["aggregated", "disaggregated", "sram-decode"])
    cv.add_argument("--prefill-hardware", default=None, help="the GPU pool for sram-decode / disaggregated prefill")
    cv.add_argument("--parallelism", default=None, help="comma-separated devices per replica (default: all that fit)")
    cv.add_argument("--spec-tokens", type=int, default=0,
                    help="speculative decoding (MTP): draft tokens verified per decode step (default 0: none)")
    cv.add_argument("--spec-acceptance", type=float, default=0.85,
                    help="chance each draft token is accepted (default 0.85, DeepSeek-V3's MTP)")
    cv.add_argument("--max-concurrency", type=int, default=0,
                    help="most sequences a replica runs (an engine's or benchmark's limit; default: none)")
    cv.add_argument("--kv-free-fraction", type=float, default=0.0,
                    help="size the KV cache as TensorRT-LLM does: this fraction of the memory the weights leave "
                         "free (its default is 0.9); default 0: weights and KV share 90%% of each device, as in "
                         "vLLM and SGLang")
    cv.add_argument("--catalog", action="append", default=[], help="extra YAML with hardware:/models: entries")
    cv.add_argument("--out", default=None, help="write the Curve JSON and a PNG chart here (path without suffix)")
    pl = sub.add_parser("plan", help="plan a factory: power split across tiers and hardware, revenue, cost")
    pl.add_argument("factory", help="factory YAML (see docs/economics.md)")
    pl.add_argument("--out", default="plan-out", help="folder for plan.md and charts")
    cl = sub.add_parser("claims", help="recompute the keynote's claims with the performance model")
    cl.add_argument("--out", default=None, help="folder for claims.md and charts")
    for p in (cv, pl, cl):
        p.add_argument("--efficiency", default=None,
                       help="JSON of efficiencies (from `tokenfab calibrate --out`) or a built-in set: "
                            "tensorrt-llm-offline, serving-benchmarks (default: the fit on all measured rows)")
    ca = sub.add_parser("calibrate", help="fit the performance model's efficiencies to measured points")
    ca.add_argument("--anchors", action="append", default=[],
                    help="CSV of measured rows, anchors.csv's columns (default: the package's anchors.csv)")
    ca.add_argument("--curve", action="append", default=[],
                    help="a measured Curve JSON (a `tokenfab bench` summary.json); needs --hardware and --model")
    ca.add_argument("--hardware", default=None, help="hardware the --curve runs were measured on")
    ca.add_argument("--model", default=None, help="model the --curve runs served")
    ca.add_argument("--precision", default="bf16", help="weight precision of the --curve runs (default bf16)")
    ca.add_argument("--isl", type=int, default=None, help="prompt tokens of the --curve runs (default: from the run)")
    ca.add_argument("--osl", type=int, default=None, help="output tokens of the --curve runs (default: from the run)")
    ca.add_argument("--fit", default=None,
                    help="comma-separated efficiencies to fit (default: eff_mem,eff_compute,eff_attention,"
                         "eff_prefill,layer_latency_s,token_cost_s,moe_token_cost_s; one device: use "
                         "step_overhead_s instead of layer_latency_s)")
    ca.add_argument("--catalog", action="append", default=[], help="extra YAML with hardware:/models: entries")
    ca.add_argument("--out", default=None, help="write the fitted efficiencies here (JSON)")
    for p in (keys, us):
        p.add_argument("--config", default=None, help="path to tokenfab.yaml")
        p.add_argument("--ledger-url", dest="ledger_url", default=None, help="ledger database URL")
    return parser


def _csv_floats(flag: str, text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise UsageError(f"{flag}: expected positive numbers, got {text!r}")
    return vals


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measure the throughput-interactivity curve of an OpenAI-compatible endpoint")
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    r = bsub.add_parser("run", help="run a load sweep and write JSONL, JSON, CSV and charts")
    r.add_argument("--url", default="http://127.0.0.1:8000/v1", help="base URL of the endpoint, ending in /v1")
    r.add_argument("--model", default=None, help="model name (default: the endpoint's first model)")
    r.add_argument("--api-key", default=None, help="API key (Bearer) for every request")
    r.add_argument("--tier-key", action="append", default=[], metavar="TIER=KEY",
                   help="an API key per tier; requests round-robin over the tiers given (repeatable)")
    load = r.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default=None, help="closed loop: comma-separated in-flight counts, e.g. 1,2,4,8")
    load.add_argument("--rate", default=None, help="open loop: comma-separated request rates per second")
    load.add_argument("--replay", default=None, metavar="TRACE.jsonl", help="replay a JSONL trace at its timestamps")
    r.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of open-loop gaps (1 = Poisson)")
    r.add_argument("--max-in-flight", type=int, default=0, help="cap on requests in flight (open loop)")
    r.add_argument("--ramp-up", type=float, default=0.0, metavar="SECONDS",
                   help="closed loop: start the streams evenly over this many seconds instead of all at once")
    r.add_argument("--requests", type=int, default=0, help="measured requests per level (default max(16, 4 x level))")
    r.add_argument("--duration", type=float, default=0.0, help="stop each level after this many seconds")
    r.add_argument("--warmup", type=int, default=1, help="requests per level run first and excluded")
    r.add_argument("--workload", default="synthetic",
                   choices=["synthetic", "shared-prefix", "multi-turn", "agentic", "replay"])
    r.add_argument("--api", default="chat", choices=["chat", "completion"])
    r.add_argument("--input-len", default="128", help="N, uniform:LO:HI or normal:MEAN:STD (tokens)")
    r.add_argument("--output-len", default="64", help="N, uniform:LO:HI or normal:MEAN:STD (tokens)")
    r.add_argument("--prefix-len", type=int, default=512, help="shared-prefix / agentic context length")
    r.add_argument("--num-prefixes", type=int, default=1)
    r.add_argument("--turns", type=int, default=4, help="multi-turn / agentic turns per conversation")
    r.add_argument("--ignore-eos", action="store_true", help="ask the endpoint to ignore EOS (vLLM/tokenfab/llama.cpp)")
    r.add_argument("--tokenizer", default=None, help=".gguf or tokenizer.json for prompt lengths (default: bundled)")
    r.add_argument("--slo-ttft-ms", type=float, default=None)
    r.add_argument("--slo-tok-s-user", type=float, default=None, help="minimum tok/s per user (1/TPOT)")
    r.add_argument("--slo-e2e-ms", type=float, default=None)
    r.add_argument("--tiers", default=None, help="YAML with a tiers: table (default: the built-in table) for "
                   "chart bands and per-tier SLOs")
    r.add_argument("--devices", type=int, default=1, help="devices behind the endpoint (for tok/s per device)")
    r.add_argument("--kw-per-device", type=float, default=None, help="all-in kW per device (for tok/s per MW)")
    r.add_argument("--pue", type=float, default=1.0)
    r.add_argument("--energy", default="auto", choices=["auto", "endpoint", "local", "none"])
    r.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    r.add_argument("--out", default="bench-out", help="output folder")
    r.add_argument("--label", default="", help="name of this run in charts")
    r.add_argument("--no-progress", action="store_true")
    c = bsub.add_parser("compare", help="overlay several runs' curves in one chart")
    c.add_argument("summaries", nargs="+", help="summary.json files (or Curve JSON)")
    c.add_argument("--out", default="compare", help="output path without suffix (.png and .html are written)")
    c.add_argument("--tiers", default=None, help="YAML with a tiers: table for the bands")


def _settings(ns: argparse.Namespace) -> Settings:
    keys = all_keys()
    cli = {k: v for k, v in vars(ns).items() if k in keys and v is not None}
    return load_settings(ns.config, cli)


def cmd_serve(ns: argparse.Namespace) -> int:
    settings = _settings(ns)
    logging.basicConfig(level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per backend request and scrape otherwise
    import uvicorn

    from tokenfab.serve.app import create_server

    try:
        app, backend, ledger = create_server(settings)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"tokenfab serve: {exc}") from None
    label = " [SYNTHETIC weights: text is noise]" if backend.info.synthetic else ""
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.server.host, port=settings.server.port, log_level=settings.server.log_level)
    )

    return _run_beside_engine(server, backend, f"tokenfab: serving {app.state.gateway.model_name}{label} on "
                              f"http://{settings.server.host}:{settings.server.port}/v1; ledger: {_shown(ledger.url)}")


def _run_beside_engine(server: typing.Any, backend: typing.Any, banner: str) -> int:
    """The HTTP server on a thread of its own, the backend (an engine loop) on the main thread; a signal
    stops the server, and a stopped server (or one that failed to bind) stops the backend."""
    def serve_http() -> None:
        try:
            server.run()
        finally:
            backend.shutdown()

    def on_signal(signum: int, frame: object) -> None:
        server.should_exit = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    http = threading.Thread(target=serve_http, name="tokenfab-http")
    http.start()
    print(banner, flush=True)
    backend.run()
    http.join()
    return 0 if server.started else 1


def cmd_worker(ns: argparse.Namespace) -> int:
    settings = _settings(ns)
    logging.basicConfig(level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per backend request and scrape otherwise
    import uvicorn

    try:
        from tokenfab.backends.embedded import EmbeddedBackend
    except ImportError as exc:
        raise UsageError(f"tokenfab worker: the engine needs PyTorch ({exc}): pip install 'tokenfab[engine]'") from None
    from tokenfab.meter.energy import detect
    from tokenfab.worker import build_worker_app

    mc = settings.meter
    energy = detect(mc.energy_source, mc.cpu_watts_per_core, mc.idle_watts)
    tiers = settings.tiers if settings.admission.tier_scheduling else None
    try:
        backend = EmbeddedBackend(settings.engine, tiers, energy, served_name=settings.server.served_model_name)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"tokenfab worker: {exc}") from None
    app = build_worker_app(backend, settings.server.served_model_name)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                                           log_level="warning"))

    return _run_beside_engine(server, backend, f"tokenfab worker: {app.state.worker.model_name} on "
                              f"http://{settings.server.host}:{settings.server.port}/v1")


def cmd_bench(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenfab.economics.tiers import TierError, load_tiers

    try:
        tiers = load_tiers(ns.tiers) if ns.tiers else None
    except (TierError, OSError) as exc:
        raise UsageError(f"tokenfab bench: --tiers: {exc}") from None
    if ns.bench_command == "compare":
        from tokenfab.bench.run import compare

        try:
            curves = compare([Path(p) for p in ns.summaries], Path(ns.out), tiers)
        except ValueError as exc:
            raise UsageError(f"tokenfab bench compare: {exc}") from None
        print(f"compared {len(curves)} runs: wrote {ns.out}.png and {ns.out}.html")
        return 0

    import httpx

    from tokenfab.bench.load import Endpoint
    from tokenfab.bench.metrics import SLOSpec
    from tokenfab.bench.run import BenchConfig, console_table, run
    from tokenfab.bench.workload import LengthDist, WorkloadError, WorkloadSpec
    from tokenfab.tokenizer import load_tokenizer

    url = ns.url.rstrip("/")
    keys = {"": ns.api_key} if ns.api_key else {}
    for item in ns.tier_key:
        tier, sep, key = item.partition("=")
        if not sep or not tier or not key:
            raise UsageError(f"tokenfab bench: --tier-key expects TIER=KEY, got {item!r}")
        keys[tier] = key
    model = ns.model
    if model is None:
        try:
            key = ns.api_key or next(iter(keys.values()), "")
            r = httpx.get(url + "/models", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise UsageError(f"tokenfab bench: cannot list models at {url}/models ({exc}); pass --model") from None
    if ns.ramp_up < 0:
        raise UsageError(f"tokenfab bench: --ramp-up must be >= 0 seconds, got {ns.ramp_up:g}")
    if ns.replay:
        mode, levels, kind = "replay", [1.0], "replay"
    elif ns.rate:
        mode, levels, kind = "rate", _csv_floats("--rate", ns.rate), ns.workload
    else:
        mode, levels, kind = "concurrency", _csv_floats("--concurrency", ns.concurrency or "1,2,4,8"), ns.workload
    try:
        LengthDist.parse(ns.input_len)
        LengthDist.parse(ns.output_len)
        tok = load_tokenizer(ns.tokenizer)
    except (WorkloadError, ValueError) as exc:
        raise UsageError(f"tokenfab bench: {exc}") from None
    slo = None
    if ns.slo_ttft_ms or ns.slo_tok_s_user or ns.slo_e2e_ms:
        slo = SLOSpec(ns.slo_ttft_ms, ns.slo_tok_s_user, ns.slo_e2e_ms)
    tier_names = [k for k in keys if k]
    if tier_names and tiers is None:
        from tokenfab.economics.tiers import default_tiers

        tiers = default_tiers()
    cfg = BenchConfig(
        endpoint=Endpoint(url, model, keys, ns.ignore_eos, ns.timeout),
        workload=WorkloadSpec(kind=kind, input_len=ns.input_len, output_len=ns.output_len, prefix_len=ns.prefix_len,
                              num_prefixes=ns.num_prefixes, turns=ns.turns, trace=ns.replay or "", api=ns.api,
                              tiers=tier_names),
        mode=mode, levels=levels, requests_per_level=ns.requests, duration_s=ns.duration, warmup=ns.warmup,
        max_in_flight=ns.max_in_flight, ramp_s=ns.ramp_up, burstiness=ns.burstiness, slo=slo, tiers=tiers, devices=ns.devices,
        kw_per_device=ns.kw_per_device, pue=ns.pue, energy=ns.energy, out_dir=Path(ns.out), label=ns.label,
        tokenizer=tok,
    )
    try:
        summary = run(cfg, progress=not ns.no_progress)
    except (WorkloadError, ValueError) as exc:
        raise UsageError(f"tokenfab bench: {exc}") from None
    print(console_table(summary))
    print(f"wrote {ns.out}/requests.jsonl, summary.json, summary.csv, chart.png, chart.html")
    return 0


def _ledger(ns: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The configured ledger, named on stderr so that every command says which database it used."""
    from tokenfab.ledger.store import Ledger, LedgerError

    from tokenfab.config import legacy_ledger_hint

    settings = load_settings(ns.config, {"ledger_url": ns.ledger_url})
    url = settings.ledger.resolved_url()
    print(f"ledger: {_shown(url)}", file=sys.stderr)
    hint = legacy_ledger_hint(settings.ledger)
    if hint:
        print(f"note: {hint}", file=sys.stderr)
    try:
        return settings, Ledger(url)
    except LedgerError as exc:
        raise UsageError(f"tokenfab {ns.command}: {exc}") from None


def _shown(url: str) -> str:
    """A ledger URL fit to print: any password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is reported when it is opened
        return url


def cmd_keys(ns: argparse.Namespace) -> int:
    from tokenfab.ledger.store import LedgerError

    settings, ledger = _ledger(ns)
    try:
        if ns.keys_command == "create":
            if ns.tier not in settings.tiers.names:
                raise UsageError(f"tokenfab keys create: unknown tier {ns.tier!r}; tiers: {', '.join(settings.tiers.names)}")
            existed = ledger.tenant(ns.tenant) is not None
            key_id, key = ledger.create_key(ns.tenant, ns.tier, ns.budget_usd)
            t = ledger.tenant(ns.tenant) or {}
            budget = t.get("budget_usd")
            left = f", ${budget - t.get('spent_usd', 0.0):g} left" if budget is not None and existed else ""
            state = f"budget ${budget:g}{left}" if budget is not None else "no budget limit"
            if existed and ns.budget_usd is None:
                state += " (the tenant's existing budget; set another with --budget-usd)"
            print(f"key id {key_id} for {'existing ' if existed else ''}tenant {ns.tenant} on tier {ns.tier}, {state}")
            print(key)
            print("store this key now: it is not shown again", file=sys.stderr)
        elif ns.keys_command == "list":
            rows = ledger.list_keys()
            print(f"{'key id':14} {'tenant':20} {'tier':10} {'status':8} {'budget $':>10} {'spent $':>12} {'held $':>10}")
            for r in rows:
                status = "revoked" if r["revoked_at"] else "active"
                budget = "-" if r["budget_usd"] is None else f"{r['budget_usd']:.4f}"
                print(f"{r['key_id']:14} {r['tenant']:20} {r['tier']:10} {status:8} {budget:>10} "
                      f"{r['spent_usd']:12.6f} {r['reserved_usd']:10.6f}")
        else:
            ledger.revoke(ns.key_id)
            print(f"revoked key {ns.key_id}")
    except LedgerError as exc:
        raise UsageError(f"tokenfab keys: {exc}") from None
    finally:
        ledger.close()
    return 0


def _since(text: str | None) -> float | None:
    if not text:
        return None
    import datetime as dt

    try:
        return float(text)
    except ValueError:
        pass
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"tokenfab usage: --since {text!r}: use an ISO date/time or unix seconds") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return d.timestamp()


USAGE_COLUMNS = ["request_id", "created_at", "tenant", "tier", "model", "status", "prompt_tokens", "cached_tokens",
                 "completion_tokens", "ttft_ms", "tpot_ms", "e2e_ms", "joules", "energy_source", "cost_usd",
                 "price_usd"]


def cmd_usage(ns: argparse.Namespace) -> int:
    import csv
    import json

    since = _since(ns.since)
    if ns.limit is not None and ns.limit < 1:
        raise UsageError(f"tokenfab usage: --limit must be at least 1, got {ns.limit}")
    _, ledger = _ledger(ns)
    rows = ledger.usage_records(ns.tenant, since, ns.limit)
    ledger.close()
    if ns.format == "json":
        print(json.dumps(rows, indent=1))
    elif ns.format == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else USAGE_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    else:
        print(f"{'request':40} {'tenant':14} {'tier':9} {'status':9} {'in':>6} {'out':>6} {'TTFT ms':>8} "
              f"{'J':>8} {'cost $':>10} {'price $':>10}")
        for r in rows:
            f = (lambda v, fmt: "-" if v is None else fmt.format(v))  # noqa: E731
            print(f"{r['request_id'][:40]:40} {r['tenant'][:14]:14} {r['tier'][:9]:9} {r['status']:9} "
                  f"{r['prompt_tokens']:6d} {r['completion_tokens']:6d} {f(r['ttft_ms'], '{:.0f}'):>8} "
                  f"{f(r['joules'], '{:.2f}'):>8} {f(r['cost_usd'], '{:.6f}'):>10} {r['price_usd']:10.6f}")
        total_in = sum(r["prompt_tokens"] for r in rows)
        total_out = sum(r["completion_tokens"] for r in rows)
        print(f"{len(rows)} records, {total_in} prompt + {total_out} completion tokens, "
              f"${sum(r['price_usd'] for r in rows):.6f} charged, "
              f"${sum(r['cost_usd'] or 0 for r in rows):.6f} cost")
    return 0


def cmd_curve(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenfab.bench import charts
    from tokenfab.perf.catalog import Catalog, CatalogError
    from tokenfab.perf.model import Scenario, sweep

    try:
        cat = Catalog.default(ns.catalog)
        hw, model = cat.hw(ns.hardware), cat.model(ns.model)
        prec = ns.precision or ("fp4" if "fp4" in hw.tflops else "fp8")
        pre = cat.hw(ns.prefill_hardware) if ns.prefill_hardware else None
        par = [int(x) for x in ns.parallelism.split(",")] if ns.parallelism else None
        if ns.spec_tokens < 0 or not 0.0 <= ns.spec_acceptance <= 1.0:
            raise ValueError("--spec-tokens must be >= 0 and --spec-acceptance within [0, 1]")
        if ns.max_concurrency < 0:
            raise ValueError("--max-concurrency must be >= 0 (0: no limit)")
        if not 0.0 <= ns.kv_free_fraction <= 1.0:
            raise ValueError("--kv-free-fraction must be within [0, 1] (0: a share of the whole device)")
        curve = sweep(Scenario(model, hw, prec, ns.isl, ns.osl, mode=ns.mode, prefill_hardware=pre,
                               spec_tokens=ns.spec_tokens, spec_acceptance=ns.spec_acceptance,
                               max_concurrency=ns.max_concurrency, kv_free_fraction=ns.kv_free_fraction),
                      _efficiency(ns, "curve"), parallelisms=par)
    except (CatalogError, ValueError, KeyError) as exc:
        raise UsageError(f"tokenfab curve: {str(exc).splitlines()[0]}") from None
    front = curve.frontier()
    print(f"{curve.name}: {len(curve.points)} points, {len(front.points)} on the frontier")
    print(f"{'devices':>8} {'conc':>6} {'tok/s/user':>11} {'tok/s/device':>13} {'tok/s/MW':>12} {'TTFT ms':>9} "
          f"{'J/token':>9} {'$/M tok':>9}")
    for p in front.points:
        e = p.extra
        print(f"{e.get('devices_per_replica', 0):8.1f} {p.concurrency:6g} {p.tok_s_user:11.1f} {p.tok_s_device:13,.1f} "
              f"{e['tok_s_per_mw']:12,.0f} {p.ttft_ms:9.0f} {p.j_per_token:9.3f} {e['usd_per_mtok']:9.3f}")
    if ns.out:
        curve.save(Path(ns.out).with_suffix(".json"))
        charts.plot_png([(curve.name, front)], Path(ns.out).with_suffix(".png"), title=curve.name)
        print(f"wrote {ns.out}.json and {ns.out}.png")
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenfab.economics.planner import PlanError
    from tokenfab.economics.report import run_plan

    eff = _efficiency(ns, "plan")
    try:
        _, text = run_plan(ns.factory, Path(ns.out), eff)
    except PlanError as exc:
        raise UsageError(f"tokenfab plan: {exc}") from None
    print(text)
    print(f"wrote {ns.out}/plan.md, curves.png, revenue.png")
    return 0


def cmd_claims(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenfab.economics.claims import charts_for, compute, markdown

    eff = _efficiency(ns, "claims")
    rows, systems = compute(eff=eff)
    text = markdown(rows, systems, eff)
    if ns.out:
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        charts_for(systems, out)
        text = text.replace("# The keynote's claims, recomputed\n", "# The keynote's claims, recomputed\n\n"
                            "![frontiers](claims-curves.png)\n")
        (out / "claims.md").write_text(text)
    print(text)
    return 0


def _efficiency(ns: argparse.Namespace, cmd: str):  # type: ignore[no-untyped-def]
    """--efficiency FILE or built-in set name, or the built-in defaults."""
    from tokenfab.perf.calibrate import load_efficiency
    from tokenfab.perf.catalog import CatalogError
    from tokenfab.perf.model import Efficiency

    if not ns.efficiency:
        return Efficiency()
    try:
        return load_efficiency(ns.efficiency)
    except CatalogError as exc:
        raise UsageError(f"tokenfab {cmd}: {exc}") from None


def cmd_calibrate(ns: argparse.Namespace) -> int:
    import dataclasses
    import json
    import statistics
    from pathlib import Path

    from tokenfab.curve import Curve
    from tokenfab.perf.calibrate import FIT, calibrate, errors, load_anchors, measured_from_curve, scorable
    from tokenfab.perf.catalog import Catalog, CatalogError
    from tokenfab.perf.model import Efficiency

    try:
        cat = Catalog.default(ns.catalog)
        rows = []
        for path in ns.anchors:
            rows += load_anchors(path)
        for path in ns.curve:
            if not (ns.hardware and ns.model):
                raise ValueError("--curve needs --hardware and --model (what the run measured)")
            try:
                curve = Curve.load(path)
            except (OSError, ValueError) as exc:
                raise ValueError(f"--curve {path}: {str(exc).splitlines()[0]}") from None
            work = curve.provenance.details.get("workload", {}) if isinstance(curve.provenance.details, dict) else {}
            isl, osl = ns.isl or _int_or_none(work.get("input_len")), ns.osl or _int_or_none(work.get("output_len"))
            if not (isl and osl):
                raise ValueError(f"--curve {path}: the run does not say its lengths; give --isl and --osl")
            cat.hw(ns.hardware), cat.model(ns.model)  # unknown names fail here, with suggestions
            rows += measured_from_curve(curve, ns.hardware, ns.model, ns.precision, isl, osl)
        if not ns.anchors and not ns.curve:
            rows = load_anchors()
        fit = tuple(x.strip() for x in ns.fit.split(",") if x.strip()) if ns.fit else FIT
        base = Efficiency()
        scored = scorable(cat, rows, base)
        fitted = calibrate(cat, scored, base, fit)
    except (CatalogError, ValueError, KeyError) as exc:
        raise UsageError(f"tokenfab calibrate: {str(exc).splitlines()[0]}") from None
    before, after = errors(cat, scored, base), errors(cat, scored, fitted)
    print(f"{'row':<48} {'at tok/s/user':>13} {'measured':>11} {'default':>11} {'error':>7} {'fitted':>11} {'error':>7}")
    for r, a, b in zip(scored, before, after):
        at = f"{r.at_tok_s_user:.1f}" if r.at_tok_s_user else "max"
        print(f"{r.label[:48]:<48} {at:>13} {r.value:11,.1f} {r.value * (1 + a):11,.1f} {a:+7.0%} "
              f"{r.value * (1 + b):11,.1f} {b:+7.0%}")
    med0, med1 = statistics.median(abs(e) for e in before), statistics.median(abs(e) for e in after)
    print(f"{len(scored)} rows: median absolute error {med0:.0%} with the defaults, {med1:.0%} fitted "
          f"(in-sample: hold rows out to test a fit)")
    print("fitted: " + ", ".join(f"{k}={getattr(fitted, k):.4g}" for k in fit))
    if ns.out:
        Path(ns.out).write_text(json.dumps({
            "efficiency": dataclasses.asdict(fitted), "fitted": list(fit), "rows": len(scored),
            "median_abs_error_default": med0, "median_abs_error_fitted": med1}, indent=2) + "\n")
        print(f"wrote {ns.out} (use it with --efficiency on curve, plan and claims)")
    return 0


def _int_or_none(v: object) -> int | None:
    try:
        return int(str(v))
    except (TypeError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
        return {"serve": cmd_serve, "worker": cmd_worker, "bench": cmd_bench, "keys": cmd_keys, "usage": cmd_usage, "curve": cmd_curve,
                "plan": cmd_plan, "claims": cmd_claims, "calibrate": cmd_calibrate}[ns.command](ns)
    except (UsageError, ConfigError) as exc:
        print(str(exc).splitlines()[0] if str(exc) else "usage error", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
