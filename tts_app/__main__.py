"""``python -m tts_app --config FILE`` / ``tts-app``: serve until SIGTERM, then drain.
``tts-app check-config FILE`` validates a config and exits 0, or 1 listing every problem.

SIGTERM (or SIGINT) stops admission first (``/readyz`` 503, new synthesis 503 SHUTTING_DOWN,
so a load balancer moves away), lets in-flight work finish within ``server.drain_timeout_s``,
closes connections within ``2 x CLOSE_GRACE_S`` more, then exits 0. Whatever still holds the
process after ``drain_timeout_s + SHUTDOWN_MARGIN_S`` (a synthesis thread that does not
return) is cut short with exit 1, so the whole shutdown fits a known grace period. A bad
config, an unusable log path, a busy port or a model that fails to load exit 1 with a message
naming what is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import threading

from aiohttp import web

from tts_app.backends import make_backend
from tts_app.batching import with_batching
from tts_app.config import AppConfig, ConfigError, load_config
from tts_app.logging import StructuredLog
from tts_app.server import STATE, build_app

# aiohttp waits up to this for each open request once the drain is over, then as long again
# for the cancelled handler: connections close within 2 x CLOSE_GRACE_S after the drain.
CLOSE_GRACE_S = 1.0
SHUTDOWN_MARGIN_S = 5.0


class StartupError(Exception):
    """Start-up cannot continue; the message is for the operator."""


def _exit_by(deadline_s: float) -> None:
    """Exit the process after ``deadline_s`` even if threads still run: a synthesis thread
    cannot be cancelled, and the interpreter joins executor threads before exiting."""
    def cut_short() -> None:
        print(f"tts-app: shutdown took over {deadline_s:g} s; exiting without waiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(deadline_s, cut_short)
    timer.daemon = True
    timer.start()


def _bind(config: AppConfig, config_file: str) -> socket.socket:
    """The listening socket, bound before anything starts: a busy port stops start-up before a
    model load begins (whose thread the process would otherwise wait for on its way out)."""
    host, port = config.server.host, config.server.port
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise StartupError(f"{config_file}: server.listen: cannot listen on "
                           f"{config.server.listen} ({exc.strerror})") from None


async def serve(config: AppConfig, config_file: str) -> int:
    sock = _bind(config, config_file)
    try:
        return await _serve(config, config_file, sock)
    finally:
        sock.close()


async def _serve(config: AppConfig, config_file: str, sock: socket.socket) -> int:
    try:
        backend = make_backend(config.backend.name, config.backend.options())
    except (TypeError, ValueError) as exc:
        raise StartupError(f"{config_file}: backend.{config.backend.name}: {exc}") from None
    except ImportError as exc:
        raise StartupError(f"{config_file}: backend.name: {config.backend.name!r} needs its "
                           f"optional dependencies (pip install 'tts-sentinel[chattts]'): "
                           f"{exc}") from None
    try:
        log = StructuredLog.from_config(config.log)
    except OSError as exc:
        raise StartupError(f"{config_file}: log.path: cannot open {config.log.path!r} "
                           f"({exc.strerror})") from None
    backend = with_batching(backend, config.batch)
    app = build_app(config, backend, log)
    state = app[STATE]
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=CLOSE_GRACE_S,
                           keepalive_timeout=config.server.header_timeout_s)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()

    def on_signal() -> None:
        # the clock starts at the signal, so a model still loading is inside the bound too
        if not stop.is_set():
            stop.set()
            _exit_by(config.server.drain_timeout_s + SHUTDOWN_MARGIN_S)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    print(f"tts-app: listening on http://{config.server.listen} (backend {backend.name})",
          file=sys.stderr, flush=True)
    await state.settled.wait()
    if state.failed is not None:
        await runner.cleanup()
        log.close()
        raise StartupError(f"backend {backend.name} failed to load: {state.failed}")
    await stop.wait()
    await state.drain()
    await runner.cleanup()
    log.event("service_stop")
    log.close()
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _report("tts-app: ", exc)
        return 1
    try:
        return asyncio.run(serve(config, args.config))
    except StartupError as exc:
        print(f"tts-app: {exc}", file=sys.stderr)
        return 1


def _check_config(args: argparse.Namespace) -> int:
    try:
        load_config(args.file)
    except ConfigError as exc:
        _report("invalid: ", exc)
        return 1
    print(f"{args.file}: valid")
    return 0


def _report(prefix: str, error: ConfigError) -> None:
    """Every problem on its own line, each naming file and key."""
    for line in str(error).splitlines():
        print(prefix + line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tts-app", description="tts-sentinel TTS HTTP app")
    parser.add_argument("--config", default="config/app.yaml", help="YAML config file")
    parser.set_defaults(func=_run)
    check = parser.add_subparsers(dest="command").add_parser(
        "check-config", help="validate a config file and exit 0/1")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
