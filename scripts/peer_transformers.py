"""The peer users would pick: HuggingFace transformers generating with the same Gemma preset and shapes.

    python scripts/peer_transformers.py --model gemma-2b --batch 1 8 --prompt-len 128 --new-tokens 256

Two rows per batch: transformers' documented fast path (`cache_implementation="static"`, which makes
`generate` compile the forward with torch.compile on GPUs) and eager generation (dynamic cache) as the
second. Weights are random bf16, built on the GPU from `config_to_hf(preset)`, so the architecture is the
one our benchmark runs. Decode time is the difference between generating N and 1 new tokens (prefill and
the first token cancel), the best of three after warm-up (compilation). EOS is disabled so that every
row decodes every step. `scripts/benchmark_generate.py --peer` runs this in a subprocess before JAX
takes the GPU, so both sides of a comparison come from one run on one machine.

On a machine without a CUDA GPU it says so and exits 0 without numbers (`--device cpu` runs it anyway,
for a smoke test of the plumbing; CPU numbers are not a peer for anything).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _timed(fn) -> float:
    import torch

    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return time.perf_counter() - start


def torch_read_bandwidth(num_bytes: int = 4 << 30) -> float:
    """Bytes/s of PyTorch's reduction over `num_bytes` of bf16 (CUDA events, ten calls queued): the read
    rate the peer's own kernels can reach, printed beside ours."""
    import torch

    x = torch.randn(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    x.sum(dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            x.sum(dtype=torch.float32)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / 10)
    del x
    return num_bytes / best


def measure(model, prompts, new_tokens: int, mode: str) -> dict:
    """Prefill and decode rates of `model.generate` in one mode ("static": static cache + compile,
    "static-nocompile", "eager": dynamic cache, no compile)."""
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    if mode.startswith("static"):
        # One cache length for both generation lengths: a static cache of another size would recompile.
        max_cache_len = prompts.shape[1] + new_tokens
        kwargs |= {
            "cache_implementation": "static",
            "max_cache_len": max_cache_len,
            "disable_compile": mode == "static-nocompile",
        }
    else:
        kwargs |= {"disable_compile": True}

    def generate(n):
        return lambda: model.generate(prompts, max_new_tokens=n, min_new_tokens=n, **kwargs)

    start = time.perf_counter()
    for n in (new_tokens, 1, new_tokens):  # compile (both lengths) and warm up
        generate(n)()
    warmup_s = time.perf_counter() - start
    full = min(_timed(generate(new_tokens)) for _ in range(3))
    first = min(_timed(generate(1)) for _ in range(3))
    batch, prompt_len = prompts.shape
    step_s = (full - first) / (new_tokens - 1)
    return {
        "mode": mode,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tok_s": batch * prompt_len / first,
        "decode_tok_s": batch / step_s,
        "step_ms": step_s * 1e3,
        "warmup_s": warmup_s,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-2b", help="a Gemma preset")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--modes", nargs="+", default=["static", "eager"], choices=["static", "static-nocompile", "eager"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from vishwam_jax.checkpoint.hf_gemma import config_to_hf
    from vishwam_jax.presets import ConfigError, get_config

    if args.device == "cuda" and not torch.cuda.is_available():
        print("transformers peer: no CUDA GPU on this machine, skipped (its numbers are GPU numbers)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"skipped": "no CUDA GPU", "rows": []}, f)
        return 0
    try:
        config = get_config(args.model)
        if config.family != "gemma":
            raise ConfigError(f"the transformers peer covers the Gemma presets, not {config.family}")
        hf_config = transformers.AutoConfig.for_model(**config_to_hf(config))
    except (KeyError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    with torch.device(args.device):  # built where it runs: no host copy of the weights
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, {device}: {args.model} "
        f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, bf16, attention "
        f"{model.config._attn_implementation})",
        flush=True,
    )
    read_bw = torch_read_bandwidth() if args.device == "cuda" else None
    if read_bw:
        print(f"PyTorch reduction read bandwidth: {read_bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    with torch.inference_mode():
        for batch in args.batch:
            generator = torch.Generator().manual_seed(0)
            prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_len), generator=generator).to(args.device)
            for mode in args.modes:
                row = measure(model, prompts, args.new_tokens, mode)
                rows.append(row)
                print(
                    f"transformers {mode} batch {batch}: prefill {row['prefill_tok_s']:,.0f} tok/s, decode "
                    f"{row['decode_tok_s']:,.1f} tok/s, step {row['step_ms']:.2f} ms "
                    f"(warm-up incl. compile {row['warmup_s']:.0f} s)",
                    flush=True,
                )
                if args.json:  # after every row: a run stopped early keeps its numbers
                    with open(args.json, "w") as f:
                        json.dump(
                            {
                                "device": device,
                                "transformers": transformers.__version__,
                                "torch_read_bw": read_bw,
                                "rows": rows,
                            },
                            f,
                            indent=2,
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
