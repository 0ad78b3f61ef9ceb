"""Detokenization per streamed token (`inference.stop_text.StopText`, which every served request with
a tokenizer runs on the engine thread), against decoding the whole output at every token (what it did
before it decoded a window).

    python scripts/benchmark_stop_text.py --tokenizer ../shared/data/grok1-tokenizer.model --tokens 256 1024
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time

import vishwam_jax as vj
from vishwam_jax.inference.stop_text import StopText
from vishwam_jax.tokenizer import SentencePieceTokenizer


def per_token_us(fn, ids, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(ids)
        best = min(best, time.perf_counter() - start)
    return best / len(ids) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a SentencePiece model")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    args = p.parse_args(argv)
    try:
        tok = SentencePieceTokenizer(args.tokenizer)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = gzip.open(vj.DEFAULT_MODEL_DIR.parent / "shakespeare.txt.gz", "rt").read()[20000:80000]
    ids = tok.encode(text)

    def windowed(ids):
        st = StopText(tok.decode, ("@@@@",))  # a stop string that never appears: every check runs
        out = "".join(st.add(t) for t in ids) + st.finish()
        assert out == tok.decode(ids), "the streamed text differs from the whole decode"

    def whole(ids):
        for i in range(len(ids)):
            tok.decode(ids[: i + 1])

    for n in args.tokens:
        a, b = per_token_us(windowed, ids[:n]), per_token_us(whole, ids[:n])
        print(f"{n} tokens: StopText {a:.1f} µs per token; decoding the whole output per token {b:.1f} µs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
