"""Generate text: `python -m vishwam_jax.generate [--model PRESET|DIR] --prompt TEXT ...`.

With no --model, uses the small Shakespeare model embedded in the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m vishwam_jax.generate",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--model",
        help="preset name (random weights, except the embedded gemma-shakespeare; see --list) "
        "or a converted model directory (default: the embedded Shakespeare demo model)",
    )
    ap.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    ap.add_argument("--prompt-file", help="file with one prompt per line")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    ap.add_argument("--top-p", type=float, default=None, help="sample among the smallest set of tokens with this mass")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument(
        "--tokenizer",
        help="tokenizer.model (SentencePiece) or tokenizer.json to use instead of the "
        "model's own (e.g. for a preset, which has random weights and no tokenizer files)",
    )
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="parameter dtype")
    ap.add_argument(
        "--quantize",
        help="quantize a float model's matmul weights as it loads: int8 (per output channel) or fp8 "
        "(e4m3 blocks); a directory converted quantized runs as stored",
    )
    ap.add_argument(
        "--fp8-activations",
        action="store_true",
        help="with fp8 weights, quantize every product's input to float8 in 1 x 128 tiles too (both "
        "operands on FP8 tensor cores, as DeepSeek-V3's own inference runs); default: weight-only",
    )
    ap.add_argument(
        "--speculative",
        action="store_true",
        help="greedy self-speculative decoding with the model's "
        "multi-token-prediction module (DeepSeek-V3): same tokens as --temperature 0, fewer decode steps",
    )
    ap.add_argument("--list", action="store_true", help="list the preset names and exit")
    ap.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a status line on stderr while compiling and decoding (default: when stderr is a terminal)",
    )
    return ap


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"prompt file {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    return prompts or ["ROMEO.\n"]


def _validate(args) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (got {args.temperature})")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (got {args.top_p})")
    from vishwam_jax.quantization import FORMATS

    if args.quantize is not None and args.quantize not in FORMATS:
        raise UsageError(f"--quantize must be one of {', '.join(FORMATS)} (got {args.quantize!r})")
    if args.speculative and (args.temperature != 0 or args.top_k is not None or args.top_p is not None):
        raise UsageError("--speculative decodes greedily: pass --temperature 0 and no --top-k/--top-p")


def run(argv=None) -> int:
    args = _parser().parse_args(argv)
    import vishwam_jax as vj  # after argument parsing: --help stays fast
    from vishwam_jax.checkpoint.orbax_io import CheckpointError
    from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError
    from vishwam_jax.inference.engine import PromptTooLongError
    from vishwam_jax.presets import UnknownModelError

    if args.list:
        from vishwam_jax.loading import EMBEDDED_MODELS

        names = vj.list_models()
        width = max(map(len, names))
        for name in names:
            kind = (
                "trained weights shipped with the package (the default --model)"
                if name in EMBEDDED_MODELS
                else "random weights"
            )
            print(f"{name:<{width}}  {kind}")
        return 0
    status = StatusLine(sys.stderr, enabled=False)
    try:
        _validate(args)
        prompts = _prompts(args)
        dtype = {"float32": np.float32, "bfloat16": "bfloat16", None: None}[args.dtype]
        if args.model in vj.list_models() and not args.tokenizer and vj.get_config(args.model).tokenizer != "bytes":
            # Said before the (possibly long) weight initialisation, not after it.
            raise UsageError(
                f"{args.model} is a preset with random weights and no tokenizer files to encode text "
                "prompts; pass one with --tokenizer"
            )
        model = vj.load(
            args.model or vj.DEFAULT_MODEL_DIR, dtype=dtype, quantize=args.quantize,
            quantize_activations="fp8" if args.fp8_activations else None,
        )  # fmt: skip
        if args.tokenizer:
            from vishwam_jax.tokenizer import tokenizer_from_file

            model.tokenizer = tokenizer_from_file(args.tokenizer, model.config)
        if model.tokenizer is None:
            raise UsageError(
                f"{args.model} has no tokenizer (tokenizer.model or tokenizer.json) to encode text "
                "prompts; pass one with --tokenizer"
            )
        encoded = [model.tokenizer.encode(p) for p in prompts]
        longest = max(len(e) for e in encoded)
        if longest + args.max_new_tokens > model.config.max_seq_len:  # before the prompt is echoed
            raise PromptTooLongError(
                f"prompt of {longest} tokens + {args.max_new_tokens} new tokens exceeds the "
                f"model's context of {model.config.max_seq_len} tokens"
            )
        if args.speculative:
            return _speculative(model, prompts, encoded, args.max_new_tokens)
        stream = len(prompts) == 1
        generated: list[list[int]] = [[] for _ in prompts]
        shown = StreamedText()
        status = StatusLine(sys.stderr, enabled=sys.stderr.isatty() if args.progress is None else args.progress)
        decoding = DecodeProgress(len(prompts), args.max_new_tokens, model.config.pad_token_id)

        def on_compile(what: str) -> None:
            status.show(f"[compiling {what} for {len(prompts)} prompt{'s' * (len(prompts) > 1)}...]")

        def on_tokens(block: np.ndarray) -> None:
            for row, ids in zip(generated, block):
                row.extend(int(i) for i in ids)
            if stream:
                if decoding.blocks == 0:  # the prompt waits for compilation, so no status line cuts into it
                    status.clear()
                    sys.stdout.write(prompts[0])
                sys.stdout.write(shown.update(model.tokenizer.decode(_until_eos(generated[0], model.config))))
                sys.stdout.flush()
                decoding.update(block)
            else:
                status.show(decoding.update(block))

        # Batched output prints at the end; with a status line, decode in blocks to report each one
        # (the same tokens as one call: inference/engine.py).
        chunk = 8 if stream else (min(16, args.max_new_tokens) if status.enabled else None)
        model.generate(
            encoded,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.seed,
            chunk=chunk,
            on_tokens=on_tokens,
            on_compile=on_compile,
        )
        status.clear()
    except (
        UsageError,
        UnknownModelError,
        CheckpointError,
        CheckpointFormatError,
        PromptTooLongError,
        ValueError,
    ) as err:
        status.clear()
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stream:
        print(shown.update(model.tokenizer.decode(_until_eos(generated[0], model.config)), final=True))
    else:
        for prompt, ids in zip(prompts, generated):
            print(f"=== {prompt!r}\n{prompt}{model.tokenizer.decode(_until_eos(ids, model.config))}\n")
    s = model.last_generation_stats
    print(
        f"[prefill {s.prefill_tokens} tokens at {s.prefill_tokens_per_s:,.0f} tok/s; decode {s.decode_tokens} tokens "
        f"at {s.decode_tokens_per_s:,.1f} tok/s; compile {s.compile_s:.1f}s]",
        file=sys.stderr,
    )
    return 0


def _speculative(model, prompts: list[str], encoded: list[list[int]], max_new_tokens: int) -> int:
    """Draft with the MTP module, verify with the main model (inference/speculative.py)."""
    import time

    from vishwam_jax.inference.speculative import SpeculativeGenerator

    generator = SpeculativeGenerator(model.graphdef, model.config)  # ValueError (exit 2) for a model without MTP
    start = time.perf_counter()
    result = generator.generate(model.params, encoded, max_new_tokens)
    elapsed = time.perf_counter() - start
    for prompt, ids in zip(prompts, result.tokens.tolist()):
        print(f"=== {prompt!r}\n{prompt}{model.tokenizer.decode(_until_eos(ids, model.config))}\n")
    print(
        f"[speculative: {result.accepted} of {result.drafted} MTP drafts accepted ({result.acceptance_rate:.0%}); "
        f"{result.steps} verify steps for up to {max_new_tokens} tokens per row; {elapsed:.1f}s including compile]",
        file=sys.stderr,
    )
    return 0


class StreamedText:
    """What to print of a growing decoded text. A character whose bytes are split between two
    streamed blocks decodes as U+FFFD until its last byte arrives, so trailing replacement characters
    are held back until then (or until the end, when they are real)."""

    def __init__(self):
        self.printed = ""

    def update(self, text: str, *, final: bool = False) -> str:
        stable = text if final else text.rstrip("\ufffd")
        if not stable.startswith(self.printed):  # a tokenizer that re-segments earlier text: print nothing twice
            return ""
        new, self.printed = stable[len(self.printed) :], stable
        return new


class StatusLine:
    """One line of stderr rewritten in place (`\\r`), erased before results are printed."""

    def __init__(self, stream, enabled: bool):
        self.stream, self.enabled, self._width = stream, enabled, 0

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r" + text.ljust(self._width))
            self.stream.flush()
            self._width = len(text)

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class DecodeProgress:
    """The status of a batched decode after each block: tokens so far and the rate since the first block."""

    def __init__(self, rows: int, max_new_tokens: int, pad_id: int, clock=None):
        import time

        self.rows, self.max_new_tokens, self.pad_id = rows, max_new_tokens, pad_id
        self.clock = clock or time.perf_counter
        self.blocks = self.steps = self.tokens = 0
        self._first: tuple[float, int] | None = None

    def update(self, block: np.ndarray) -> str:
        now = self.clock()
        self.blocks += 1
        self.steps += block.shape[1]
        self.tokens += int(np.sum(block != self.pad_id))
        rate = ""
        if self._first is None:  # the first block also paid for compiling and prefill: rates start after it
            self._first = (now, self.tokens)
        elif now > self._first[0]:
            rate = f", {(self.tokens - self._first[1]) / (now - self._first[0]):,.1f} tok/s"
        return (
            f"[decoding: {min(self.steps, self.max_new_tokens)}/{self.max_new_tokens} tokens per row, "
            f"{self.tokens} tokens over {self.rows} rows{rate}]"
        )


def _until_eos(ids: list[int], config) -> list[int]:
    stop = set(np.atleast_1d(np.array(config.eos_token_id)).tolist()) | {config.pad_token_id}
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
