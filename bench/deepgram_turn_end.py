"""End of speech → `transcript.final` with Deepgram (the protocol fake on loopback), per endpointing.

A page says 8 complete questions, one at a time, through the real gateway, STT worker (Deepgram
provider) and avatar worker; each is timed from its last audio frame leaving the page to its
final arriving there. The fake answers `Finalize` at once and ends an utterance exactly
`DEEPGRAM_ENDPOINTING_MS` after its last word, so the figure is what the STT worker waits for:
Deepgram's endpoint, or its own early `Finalize` (the user quiet for 0.25 s after a finished question).

    python -m bench.deepgram_turn_end --endpointing 300,800 [--early-finalize false]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from avatar_stack.up import free_port, redis_binary, start_redis
from tests.fakes.deepgram import FakeDeepgram, Speech
from tests.room import said
from tests.test_conversation import open_room
from tests.test_deepgram_stack import deepgram_stack

KEY = "bench-deepgram-turn-end-key"
QUESTIONS = ("what is redis?", "how does it scale?", "can it run offline?", "which avatars are there?",
             "who wrote it?", "is it free?", "where does it run?", "what is livekit?")


async def one(redis_url: str, endpointing_ms: int, early: str) -> list[float]:
    async with FakeDeepgram(KEY) as fake, deepgram_stack(
        redis_url, fake, key=KEY, DEEPGRAM_ENDPOINTING_MS=str(endpointing_ms), DEEPGRAM_EARLY_FINALIZE=early
    ) as stack:
        async for room in open_room(stack):
            waits = []
            for question in QUESTIONS:
                mark = len(room.events)
                end = await said(room, Speech().say(question).pcm)
                final = await room.next("transcript.final", mark, 30)
                assert final is not None, f"no final for {question!r}"
                waits.append(1000 * (final["_rx"] - end))
                await room.next("avatar.stopped_talking", mark, 60)  # one question at a time
            return waits
    raise AssertionError("the room did not open")


async def main(endpointings: list[int], early: str) -> None:
    port = free_port()
    redis = start_redis(redis_binary() or "redis-server", port)
    try:
        for endpointing_ms in endpointings:
            waits = await one(f"redis://127.0.0.1:{port}/0", endpointing_ms, early)
            print(f"DEEPGRAM_ENDPOINTING_MS={endpointing_ms} DEEPGRAM_EARLY_FINALIZE={early}: "
                  f"speech end -> transcript.final "
                  f"median {statistics.median(waits):.0f} ms, max {max(waits):.0f} ms (n={len(waits)})")
    finally:
        redis.terminate()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpointing", default="300,800", help="comma-separated DEEPGRAM_ENDPOINTING_MS values")
    parser.add_argument("--early-finalize", choices=("true", "false"), default="true",
                        help="DEEPGRAM_EARLY_FINALIZE (false: wait for Deepgram's endpoint, the 'before')")
    args = parser.parse_args()
    asyncio.run(main([int(v) for v in args.endpointing.split(",")], args.early_finalize))
