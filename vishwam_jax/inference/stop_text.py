"""A request's generated text as it streams: decoded incrementally, cut at its first stop string.

Text is released only when it can no longer change: a multi-byte character split between tokens
decodes as U+FFFD until its last byte arrives, and text that could still grow into a stop string
is held back until it either completes the stop string (and is dropped with it) or diverges.

Each token decodes one short window, not the whole output (which made a stream's detokenization
quadratic in its length): the ids from a point where the text was complete. The window's decode at
the last complete point (its head, kept from then) is already counted; the rest is new. Both
decodes start at the same id, so a tokenizer's rule for the first piece (SentencePiece drops its
leading space) applies to both alike. The window moves on every WINDOW tokens, at the cost of one
more decode. A window whose decode does not extend its head (a tokenizer that re-segments across
the boundary) falls back to decoding everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"  # what a multi-byte character missing its last bytes decodes to
WINDOW = 16  # ids a window grows to before it moves on


class StopText:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._text = ""  # decoded text of ids[:_read], complete
        self._window = 0  # windows start here, a point where the text was complete
        self._read = 0  # ids whose text is in _text
        self._head = ""  # decode(ids[_window:_read])
        self.released = ""  # text handed out so far
        self.stopped = False  # a stop string has appeared; nothing more will be released

    def add(self, token: int) -> str:
        """Add one generated token; returns the newly releasable text."""
        if self.stopped:
            return ""
        self._ids.append(int(token))
        searched_to = len(self._text)
        text = self._extend()
        for s in self._stop:
            at = text.find(s, max(0, searched_to - len(s) + 1))
            if at >= 0:
                self.stopped = True
                return self._release(text[:at])
        stable = text.rstrip(_INCOMPLETE)
        hold = max((_partial_suffix(stable, s) for s in self._stop), default=0)
        return self._release(stable[: len(stable) - hold])

    def finish(self) -> str:
        """The rest of the text once generation has ended (held-back characters are real now)."""
        if self.stopped:
            return ""
        return self._release(self._decode(self._ids))

    def _extend(self) -> str:
        """The whole text so far, from the window's decode; records it once it is complete."""
        window = self._decode(self._ids[self._window :])
        if window.startswith(self._head):
            new = window[len(self._head) :]
            text, complete = self._text + new, not new.endswith(_INCOMPLETE)
        else:
            text = self._decode(self._ids)
            complete = not text.endswith(_INCOMPLETE)
        if complete:
            previous, self._text, self._read, self._head = self._read, text, len(self._ids), window
            if len(self._ids) - self._window > WINDOW:  # the last complete point before this one
                self._window, self._head = previous, self._decode(self._ids[previous:])
        return text

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
