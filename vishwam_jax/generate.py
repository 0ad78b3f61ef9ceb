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
    ap = argparse.ArgumentParser(prog="python -m vishwam_jax.generate", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="preset name (random weights; see --list) or a converted model directory "
                    "(default: the embedded Shakespeare demo model)")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    ap.add_argument("--prompt-file", help="file with one prompt per line")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    ap.add_argument("--top-p", type=float, default=None, help="sample among the smallest set of tokens with this mass")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--tokenizer", help="tokenizer.model (SentencePiece) or tokenizer.json to use instead of the "
                    "model's own (e.g. for a preset, which has random weights and no tokenizer files)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="parameter dtype")
    ap.add_argument("--speculative", action="store_true", help="greedy self-speculative decoding with the model's "
                    "multi-token-prediction module (DeepSeek-V3): same tokens as --temperature 0, fewer decode steps")
    ap.add_argument("--list", action="store_true", help="list the preset names and exit")
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
        print("\n".join(vj.list_models()))
        return 0
    try:
        _validate(args)
        prompts = _prompts(args)
        dtype = {"float32": np.float32, "bfloat16": "bfloat16", None: None}[args.dtype]
        if args.model in vj.list_models() and not args.tokenizer and vj.get_config(args.model).tokenizer != "bytes":
            # Said before the (possibly long) weight initialisation, not after it.
            raise UsageError(f"{args.model} is a preset with random weights and no tokenizer files to encode text "
                             "prompts; pass one with --tokenizer")
        model = vj.load(args.model or vj.DEFAULT_MODEL_DIR, dtype=dtype)
        if args.tokenizer:
            from vishwam_jax.tokenizer import tokenizer_from_file

            model.tokenizer = tokenizer_from_file(args.tokenizer, model.config)
        if model.tokenizer is None:
            raise UsageError(f"{args.model} has no tokenizer (tokenizer.model or tokenizer.json) to encode text "
                             "prompts; pass one with --tokenizer")
        encoded = [model.tokenizer.encode(p) for p in prompts]
        longest = max(len(e) for e in encoded)
        if longest + args.max_new_tokens > model.config.max_seq_len:  # before the prompt is echoed
            raise PromptTooLongError(f"prompt of {longest} tokens + {args.max_new_tokens} new tokens exceeds the "
                                     f"model's context of {model.config.max_seq_len} tokens")
        if args.speculative:
            return _speculative(model, prompts, encoded, args.max_new_tokens)
        stream = len(prompts) == 1
        generated: list[list[int]] = [[] for _ in prompts]
        shown = StreamedText()
        if stream:
            sys.stdout.write(prompts[0])

        def on_tokens(block: np.ndarray) -> None:
            for row, ids in zip(generated, block):
                row.extend(int(i) for i in ids)
            if stream:
                sys.stdout.write(shown.update(model.tokenizer.decode(_until_eos(generated[0], model.config))))
                sys.stdout.flush()

        model.generate(encoded, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                       chunk=8 if stream else None, on_tokens=on_tokens)
    except (UsageError, UnknownModelError, CheckpointError, CheckpointFormatError, PromptTooLongError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stream:
        print(shown.update(model.tokenizer.decode(_until_eos(generated[0], model.config)), final=True))
    else:
        for prompt, ids in zip(prompts, generated):
            print(f"=== {prompt!r}\n{prompt}{model.tokenizer.decode(_until_eos(ids, model.config))}\n")
    s = model.last_generation_stats
    print(f"[prefill {s.prefill_tokens} tokens at {s.prefill_tokens_per_s:,.0f} tok/s; decode {s.decode_tokens} tokens "
          f"at {s.decode_tokens_per_s:,.1f} tok/s; compile {s.compile_s:.1f}s]", file=sys.stderr)
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
    print(f"[speculative: {result.accepted} of {result.drafted} MTP drafts accepted ({result.acceptance_rate:.0%}); "
          f"{result.steps} verify steps for up to {max_new_tokens} tokens per row; {elapsed:.1f}s including compile]",
          file=sys.stderr)
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
        new, self.printed = stable[len(self.printed):], stable
        return new


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
