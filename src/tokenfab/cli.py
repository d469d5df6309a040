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
    return parser


def _settings(ns: argparse.Namespace) -> Settings:
    keys = all_keys()
    cli = {k: v for k, v in vars(ns).items() if k in keys and v is not None}
    return load_settings(ns.config, cli)


def cmd_serve(ns: argparse.Namespace) -> int:
    settings = _settings(ns)
    logging.basicConfig(level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from tokenfab.engine.async_engine import AsyncEngine
    from tokenfab.engine.llm_engine import LLMEngine
    from tokenfab.serve.app import build_app

    try:
        core = LLMEngine(settings.engine)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"tokenfab serve: {exc}") from None
    engine = AsyncEngine(core)
    app = build_app(settings, engine)
    label = " [SYNTHETIC weights: text is noise]" if core.loaded.synthetic else ""
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.server.host, port=settings.server.port, log_level=settings.server.log_level)
    )

    def serve_http() -> None:
        try:
            server.run()
        finally:
            engine.shutdown()  # the HTTP server is gone (stopped, or failed to bind): stop the engine too

    def on_signal(signum: int, frame: object) -> None:
        server.should_exit = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    http = threading.Thread(target=serve_http, name="tokenfab-http")
    http.start()
    print(
        f"tokenfab: serving {app.state.gateway.model_name}{label} on http://{settings.server.host}:{settings.server.port}/v1",
        flush=True,
    )
    engine.run()  # the engine loop owns the main thread
    http.join()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
        return {"serve": cmd_serve}[ns.command](ns)
    except (UsageError, ConfigError) as exc:
        print(str(exc).splitlines()[0] if str(exc) else "usage error", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
