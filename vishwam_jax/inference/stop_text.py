"""A request's generated text as it streams: decoded incrementally, cut at its first stop string.

Text is released only when it can no longer change: a multi-byte character split between tokens
decodes as U+FFFD until its last byte arrives, and text that could still grow into a stop string
is held back until it either completes the stop string (and is dropped with it) or diverges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StopText:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self.released = ""  # text handed out so far
        self.stopped = False  # a stop string has appeared; nothing more will be released

    def add(self, token: int) -> str:
        """Add one generated token; returns the newly releasable text."""
        if self.stopped:
            return ""
        self._ids.append(int(token))
        text = self._decode(self._ids)
        for s in self._stop:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                return self._release(text[:at])
        stable = text.rstrip("\ufffd")
        hold = max((_partial_suffix(stable, s) for s in self._stop), default=0)
        return self._release(stable[: len(stable) - hold])

    def finish(self) -> str:
        """The rest of the text once generation has ended (held-back characters are real now)."""
        if self.stopped:
            return ""
        return self._release(self._decode(self._ids))

    def _release(self, text: str) -> str:
        # A tokenizer may re-segment earlier text; never hand out a character twice.
        if not text.startswith(self.released):
            return ""
        new, self.released = text[len(self.released) :], text
        return new


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
