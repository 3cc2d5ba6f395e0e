"""The floor: a reply that is ready waits, unheard, while the user has begun to speak again.

A voice turn is answered as soon as it ends, and the brain starts at once. If the user's voice
starts again before a word of the answer is heard (they only paused: "So I was wondering …
how many people …"), starting now would talk over them, and the half-question would get half an
answer. So the reply is held: the user's next turn drops it unheard and is answered together with
the turn it belonged to; more words keep it waiting; and if nothing but the onset comes (a cough, a
door) within `hold_s` of the last voice, it goes ahead. The reply was begun speculatively, so a
reply that is not held costs nothing, and one that is dropped was never heard.

Once the avatar is audible this no longer applies: a bare onset then never stops it (barge-in needs
words, `TurnPolicy`).
"""

from __future__ import annotations

import asyncio
import contextlib


class Floor:
    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.holding = False  # a reply is waiting here, unheard
        self.on_air = False  # the current reply has been let through: it is (being) heard
        self._voice_since_turn = False  # the user's voice began after the last turn ended
        self._last_voice = 0.0  # loop time of that voice (an onset or words)
        self._dropped = False
        self._changed = asyncio.Event()

    def voice(self) -> None:
        """The user's voice began, or words of it came (an interim)."""
        self._voice_since_turn = True
        self._last_voice = asyncio.get_running_loop().time()
        self._changed.set()

    def settled(self) -> None:
        """The voice so far is accounted for: it was a turn (the one being answered, or the next),
        or it was not one (echo, a backchannel). A held reply may go on."""
        self._voice_since_turn = False
        self._changed.set()

    def reply_begun(self) -> None:
        """A new reply is being prepared (the brain starts on it)."""
        self.on_air = self._dropped = False

    def drop(self) -> None:
        """The reply being prepared will not be said, even if it was not yet here."""
        if not self.on_air:
            self._dropped = True
            self._changed.set()

    async def wait(self) -> bool:
        """True at once unless the user has spoken since the last turn; then True once they have
        been quiet for `hold_s` (or it is released). False if the reply was dropped."""
        loop = asyncio.get_running_loop()
        try:
            while self.hold_s and self._voice_since_turn and not self._dropped:
                left = self._last_voice + self.hold_s - loop.time()
                if left <= 0:
                    break
                self.holding = True
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._changed.wait()
        finally:
            self.holding = False
        self.on_air = not self._dropped
        return self.on_air
