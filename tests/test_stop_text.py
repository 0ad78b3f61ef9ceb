"""Streamed text with stop strings: the windowed decode releases what decoding everything at each
token releases (multi-byte characters split across tokens, a SentencePiece-style first-piece rule,
stop strings across token boundaries), and decodes a bounded number of ids per token."""

from __future__ import annotations

import numpy as np
import pytest

from vishwam_jax.inference.stop_text import WINDOW, StopText, _partial_suffix
from vishwam_jax.tokenizer import ByteTokenizer


class _WholeDecode:
    """The specification: decode every id at every token (what StopText did before its window)."""

    def __init__(self, decode, stop):
        self.decode, self.stop, self.ids, self.released, self.stopped = decode, tuple(stop), [], "", False

    def add(self, token):
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        for s in self.stop:
            if (at := text.find(s)) >= 0:
                self.stopped = True
                return self._release(text[:at])
        stable = text.rstrip("\ufffd")
        return self._release(stable[: len(stable) - max((_partial_suffix(stable, s) for s in self.stop), default=0)])

    def finish(self):
        return "" if self.stopped else self._release(self.decode(self.ids))

    def _release(self, text):
        if not text.startswith(self.released):
            return ""
        new, self.released = text[len(self.released) :], text
        return new


PIECES = ["▁the", "▁a", "re", "d", ".", "▁", "x", "é", "▁ca", "t", "!"]


def sentencepiece_like(ids):
    """Pieces joined, "▁" read as a space, the first piece's leading space dropped (SentencePiece's rule)."""
    return "".join(PIECES[i] for i in ids).replace("▁", " ").removeprefix(" ")


def _stream(make, tokens):
    st = make()
    out = [st.add(t) for t in tokens]
    return out + [st.finish()], st.stopped


@pytest.mark.parametrize("tokenizer", ["bytes", "sentencepiece-like"])
@pytest.mark.parametrize("stop", [(), ("re",), ("é!", "x.x"), ("the a",)])
def test_windowed_decode_releases_what_decoding_everything_releases(tokenizer, stop):
    rng = np.random.default_rng(len(stop))
    if tokenizer == "bytes":
        decode = ByteTokenizer().decode
        text = "".join(rng.choice(list("the re.é€😀x!a ")) for _ in range(300))
        sequences = [list(text.encode("utf-8"))]  # multi-byte characters split across tokens
    else:
        decode = sentencepiece_like
        sequences = [list(rng.integers(0, len(PIECES), 300))]
    sequences += [list(s[:n]) for s in sequences for n in (1, 2, 7)]
    for tokens in sequences:
        ours = _stream(lambda: StopText(decode, stop), tokens)
        assert ours == _stream(lambda: _WholeDecode(decode, stop), tokens), (tokenizer, stop, len(tokens))


def test_each_token_decodes_a_bounded_window():
    decoded = []

    def counting(ids):
        decoded.append(len(ids))
        return ByteTokenizer().decode(ids)

    st = StopText(counting, ("never appears",))
    for t in "a stream of plain text, é and 😀 included, ".encode() * 40:
        st.add(t)
    # About one decode per token, of at most a window and a character's bytes: never the whole output.
    assert max(decoded) <= WINDOW + 4 and len(decoded) <= 1.2 * len(st._ids)
