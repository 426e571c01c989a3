"""``tts-exporter``: run the sidecar, validate a config, or analyse logs offline.

    tts-exporter --config config/exporter.yaml      # run
    tts-exporter check-config config/exporter.yaml  # exit 0 when valid, 1 listing every problem
    tts-exporter analyze [--since T] [--until T] [--id ID] [--json] FILES...  # forensics
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import msgspec

from exporter.analyze.cli import add_arguments
from exporter.analyze.cli import run as run_analyze
from exporter.config import ConfigError, load_config


def _run(args: argparse.Namespace) -> int:
    from exporter.sidecar import Sidecar, StartupError
    from exporter.webconfig import WebConfig, load_web_config

    try:
        config = load_config(args.config)
        if args.web_config_file is not None:
            config = msgspec.structs.replace(config, server=msgspec.structs.replace(
                config.server, web_config_file=args.web_config_file))
        path = config.server.web_config_file
        web_config = load_web_config(path) if path else WebConfig()
    except ConfigError as exc:
        _report("tts-exporter: invalid config: ", exc)
        return 1
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: "
                                                    "%(message)s")
    try:
        asyncio.run(Sidecar(config, web_config).run_until_signalled())
    except StartupError as exc:
        print(f"tts-exporter: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _report(prefix: str, error: ConfigError) -> None:
    """Every problem on its own line, each naming file and key."""
    for line in str(error).splitlines():
        print(prefix + line, file=sys.stderr)


def _check_config(args: argparse.Namespace) -> int:
    from exporter.webconfig import load_web_config

    try:
        config = load_config(args.file)
        if config.server.web_config_file:
            load_web_config(config.server.web_config_file)
    except ConfigError as exc:
        _report("invalid: ", exc)
        return 1
    print(f"{args.file}: valid")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tts-exporter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/exporter.yaml", help="YAML config file")
    parser.add_argument("--log-level", default="INFO", help="the sidecar's own log level")
    parser.add_argument("--web.config.file", dest="web_config_file", default=None,
                        help="exporter-toolkit web config (TLS, basic auth); overrides "
                             "server.web_config_file")
    parser.set_defaults(func=_run)
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check-config", help="validate a config file and exit 0/1")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    analyze = sub.add_parser("analyze", help="summarise rotated app logs, or one request's "
                                             "timeline (--id)")
    add_arguments(analyze)
    analyze.set_defaults(func=run_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
