"""Barge-in with Deepgram (the protocol fake on loopback): how soon the avatar goes quiet when the
user talks over it, and whether noise or a backchannel stops it.

The real gateway, STT worker (Deepgram provider) and local avatar worker; a page asks a question
with a long answer, and 2 s into the reply it says one of 8 barge-in phrases, 4 backchannels or 4
noise bursts. Timed from the first frame of the user's voice leaving the page to `avatar.paused`
(or an interrupted `avatar.stopped_talking`) arriving there. Words only reach the avatar worker
as Deepgram gives them, so the figure is set by Deepgram's interim cadence: the fake sends an
interim as each word ends (`--interim-every 0`) or on a clock (`--interim-every 1.0`, as in
Deepgram's own interim-results example).

    python -m bench.deepgram_barge_in --interim-every 0,1.0
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from avatar_stack.up import free_port, redis_binary, start_redis
from tests.fakes.deepgram import FakeDeepgram, Speech
from tests.room import Room, said, since
from tests.test_conversation import open_room
from tests.test_deepgram_stack import deepgram_stack

KEY = "bench-deepgram-barge-in-key"
TRIGGER = "tell me about the avatar providers"
BARGE_INS = ("wait how do i scale it", "stop what is redis", "hold on which providers are there",
             "sorry can it run offline", "actually tell me about livekit", "no i mean the price",
             "excuse me who wrote it", "one question is it free")
BACKCHANNELS = ("mhm", "yeah", "right", "okay")
NOISE_S = (0.2, 0.4, 0.6, 0.3)
QUIET_WITHIN_S = 2.0


async def over_the_avatar(room: Room, pcm: bytes) -> dict:
    """Start a long reply, say `pcm` 2 s into it; what happened."""
    mark = len(room.events)
    await said(room, Speech().say(TRIGGER).pcm)
    if await room.next("avatar.started_talking", mark, 30) is None:
        return {"error": "no reply"}
    await asyncio.sleep(2.0)
    over = len(room.events)
    onset = time.monotonic()
    await said(room, pcm)
    quiet = await room.wait(lambda e: e in room.events[over:] and (
        e["type"] == "avatar.paused" or (e["type"] == "avatar.stopped_talking" and e.get("interrupted"))),
        QUIET_WITHIN_S + 1.0)
    await room.quiet()
    return {"quiet_after_s": None if quiet is None else quiet["_rx"] - onset,
            "stopped": any(e.get("interrupted") for e in since(room, over, "avatar.stopped_talking")),
            "paused": bool(since(room, over, "avatar.paused"))}


async def one(redis_url: str, interim_every_s: float) -> dict[str, list[dict]]:
    async with FakeDeepgram(KEY, interim_every_s=interim_every_s) as fake, deepgram_stack(
        redis_url, fake, key=KEY
    ) as stack:
        async for room in open_room(stack):
            return {
                "barge_in": [await over_the_avatar(room, Speech().say(p).pcm) for p in BARGE_INS],
                "backchannel": [await over_the_avatar(room, Speech().say(w).pcm) for w in BACKCHANNELS],
                "noise": [await over_the_avatar(room, Speech().noise(s).pcm) for s in NOISE_S],
            }
    raise AssertionError("the room did not open")


def report(interim_every_s: float, rows: dict[str, list[dict]]) -> None:
    quiet = sorted(r["quiet_after_s"] for r in rows["barge_in"] if r.get("quiet_after_s") is not None)
    missed = sum(r.get("quiet_after_s") is None or r["quiet_after_s"] > QUIET_WITHIN_S for r in rows["barge_in"])
    others = rows["backchannel"] + rows["noise"]
    p95 = quiet[min(len(quiet) - 1, round(0.95 * (len(quiet) - 1)))] if quiet else float("nan")
    print(f"interims {'per word' if not interim_every_s else f'every {interim_every_s:g} s'}: "
          f"onset -> quiet median {statistics.median(quiet) if quiet else float('nan'):.2f} s, p95 {p95:.2f} s, "
          f"missed {missed}/{len(rows['barge_in'])}; backchannel/noise: "
          f"stopped {sum(r.get('stopped', False) for r in others)}/{len(others)}, "
          f"paused {sum(r.get('paused', False) for r in others)}/{len(others)}")


async def main(cadences: list[float]) -> None:
    port = free_port()
    redis = start_redis(redis_binary() or "redis-server", port)
    try:
        for every in cadences:
            report(every, await one(f"redis://127.0.0.1:{port}/0", every))
    finally:
        redis.terminate()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interim-every", default="0,1.0",
                        help="comma-separated interim periods for the fake, in s (0: an interim per word)")
    asyncio.run(main([float(v) for v in parser.parse_args().interim_every.split(",")]))
