"""The `avatar-stack` command: run everything, one service, or a command-line conversation."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from avatar_stack import __version__
from common.settings import get_settings

SERVICES_AND_DOCTOR = ("up", "gateway", "stt-worker", "avatar-worker", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-stack", description=__doc__)
    parser.add_argument("--version", action="version", version=f"avatar-stack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start Redis (if needed), the gateway and one worker of each kind")
    sub.add_parser("gateway", help="run the gateway (REST + browser WebSocket + page)")
    sub.add_parser("stt-worker", help="run one speech-to-text worker")
    sub.add_parser("avatar-worker", help="run one avatar worker")
    say = sub.add_parser("say", help="stream a WAV file as a user would speak it; print the events")
    say.add_argument("wav", help="a 16-bit PCM WAV file (any rate, mono or stereo)")
    say.add_argument("--url", default=None, help="gateway URL (default: from GATEWAY_HOST/GATEWAY_PORT)")
    say.add_argument("--timeout", type=float, default=60.0, help="seconds after the file for the last reply")
    say.add_argument(
        "--settle", type=float, default=3.0, help="quiet seconds after the file (and the last reply) before exiting"
    )
    say.add_argument("--api-key", default=None, help="GATEWAY_API_KEY, if the gateway requires one")
    sub.add_parser(
        "doctor", help="show the resolved settings (secrets masked) and check Redis and each configured vendor"
    )
    bench = sub.add_parser("bench", help="measure per-hop latency and capacity with fake vendors (see bench/)")
    bench.set_defaults(bench_parser=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)

    if args.command in SERVICES_AND_DOCTOR and not os.environ.get("AVATAR_STACK_SETTINGS_CHECKED"):
        from avatar_stack.config import warn_unknown_settings

        warn_unknown_settings(sys.stderr)  # a misspelt setting would otherwise be silently ignored
    settings = get_settings()
    if args.command == "doctor":
        from avatar_stack.doctor import doctor

        return doctor(settings)
    if args.command == "up":
        from avatar_stack.up import up

        return up(settings)
    if args.command == "gateway":
        from gateway.main import run as run_gateway

        run_gateway(settings)
    elif args.command == "stt-worker":
        from stt_service.main import run as run_stt

        run_stt(settings)
    elif args.command == "avatar-worker":
        from avatar_service.main import run as run_avatar

        run_avatar(settings)
    elif args.command == "say":
        from avatar_stack.say import say as say_file

        host = "127.0.0.1" if settings.gateway_host in ("0.0.0.0", "::") else settings.gateway_host
        url = args.url or f"http://{host}:{settings.gateway_port}"
        key = args.api_key or (settings.gateway_api_key.get_secret_value() if settings.gateway_api_key else None)
        return asyncio.run(say_file(args.wav, url, timeout_s=args.timeout, api_key=key, settle_s=args.settle))
    return 0


def _bench(argv: list[str]) -> int:
    """The benchmark lives in the checkout's `bench/` and uses its `tests/fakes/`: run from a checkout."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "tests" / "fakes").is_dir():
        print("avatar-stack bench needs a checkout of the repository (it uses tests/fakes/)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from bench.capacity import build_parser as bench_parser
    from bench.capacity import run as run_bench

    return run_bench(bench_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
