"""The `avatar-stack` command: run everything, one service, or a command-line conversation."""

from __future__ import annotations

import argparse
import asyncio
import sys

from common.settings import get_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-stack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start Redis (if needed), the gateway and one worker of each kind")
    sub.add_parser("gateway", help="run the gateway (REST + browser WebSocket + page)")
    sub.add_parser("stt-worker", help="run one speech-to-text worker")
    sub.add_parser("avatar-worker", help="run one avatar worker")
    say = sub.add_parser("say", help="stream a WAV file as a user would speak it; print the events")
    say.add_argument("wav", help="a 16-bit PCM WAV file (any rate, mono or stereo)")
    say.add_argument("--url", default=None, help="gateway URL (default: from GATEWAY_HOST/GATEWAY_PORT)")
    say.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the reply")
    say.add_argument("--api-key", default=None, help="GATEWAY_API_KEY, if the gateway requires one")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    settings = get_settings()
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
        return asyncio.run(say_file(args.wav, url, timeout_s=args.timeout, api_key=key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
