"""A script client: ask the avatar typed questions (or stream a WAV file) and print its replies.

    python examples/client.py "What is avatar stack?" "How does it scale?"
    python examples/client.py --wav question.wav
    GATEWAY_URL=https://avatars.example.com GATEWAY_API_KEY=... python examples/client.py "Hello"

Uses the package's client, `avatar_stack.client` (pip install avatar-stack).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from avatar_stack.client import Conversation, create_session, end_session
from common.pcm import read_wav_16k_mono


def replies(conv: Conversation) -> list[str]:
    """Reply ids in order (a streamed reply may come as several avatar.reply events)."""
    return list(dict.fromkeys(e["reply_id"] for e in conv.of_type("avatar.reply")))


async def ask(conv: Conversation, question: str, timeout_s: float) -> str:
    """A typed turn; returns the text of the reply once the avatar finished saying it."""
    before = len(replies(conv))
    await conv.send_text(question)
    await conv.wait_for(lambda _e: len(replies(conv)) > before, timeout_s)
    reply_id = replies(conv)[before]
    await conv.wait_for(
        lambda e: e.get("type") == "avatar.stopped_talking" and e.get("reply_id") == reply_id, timeout_s
    )
    return [e["text"] for e in conv.of_type("avatar.reply") if e["reply_id"] == reply_id][-1]


async def main(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    session = await create_session(url, api_key=args.api_key or None)
    conv = Conversation(session)
    await conv.connect()
    try:
        await conv.wait_type("session.ready", 60)
        if args.wav:
            await conv.stream(read_wav_16k_mono(args.wav), trailing_silence_s=2.0)
            reply = await conv.wait_type("avatar.reply", args.timeout)
            print(f"avatar: {reply['text']}")
        for question in args.questions:
            print(f"you:    {question}")
            print(f"avatar: {await ask(conv, question, args.timeout)}")
    finally:
        await conv.close()
        await end_session(url, session)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("questions", nargs="*", help="typed questions, asked one after another")
    parser.add_argument("--wav", help="a WAV file to say first (16-bit PCM)")
    parser.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("GATEWAY_API_KEY", ""))
    parser.add_argument("--timeout", type=float, default=60.0)
    sys.exit(asyncio.run(main(parser.parse_args())))
