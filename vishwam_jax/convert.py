"""Convert an official checkpoint into a vishwam_jax model directory (Orbax).

    python -m vishwam_jax.convert SRC DST [--dtype bfloat16] [--config grok-1] [--quantize int8|fp8]

Formats (auto-detected): HuggingFace Gemma / Gemma 2 / Gemma 3 and DeepSeek-V3 (config.json +
*.safetensors, including DeepSeek's FP8 block-scaled release), and the Grok-1 release (ckpt-0/).
--quantize stores the matmul weights int8 (per output channel) or fp8 (e4m3, 128x128 blocks): DeepSeek's
FP8 release keeps its own float8 weights and scales, Grok-1's release its int8 values where it can.
WARNING: the Grok-1 release is a set of Python pickles, and unpickling can run code: convert only
checkpoints from a source you trust (the converter refuses files outside the release's layout).
"""

from __future__ import annotations

import argparse
import json
import sys
import types

from vishwam_jax.checkpoint.convert import convert


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default."""


def run(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vishwam_jax.convert", description=__doc__, formatter_class=_HelpFormatter
    )
    ap.add_argument("src", help="source checkpoint directory")
    ap.add_argument("dst", help="destination model directory (must not exist unless --overwrite)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="storage dtype of floating weights")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument(
        "--config",
        help="Grok-1 only (the release has no config file): a preset name and/or JSON "
        "overrides in the release's field names, e.g. 'grok-1' or '{\"num_layers\": 2}'",
    )
    ap.add_argument(
        "--quantize",
        help="store the matmul weights quantized: int8 (per output channel) or fp8 (e4m3 blocks); "
        "norms, routers and embeddings stay float",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar (it is shown only when stderr is a terminal)")
    args = ap.parse_args(argv)

    from vishwam_jax.checkpoint.orbax_io import CheckpointError
    from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError
    from vishwam_jax.presets import UnknownModelError
    from vishwam_jax.quantization import FORMATS, QuantizationError

    if args.quantize is not None and args.quantize not in FORMATS:
        print(f"error: --quantize must be one of {', '.join(FORMATS)} (got {args.quantize!r})", file=sys.stderr)
        return 2
    options = {}
    if args.config is not None:
        options["config"] = json.loads(args.config) if args.config.lstrip().startswith("{") else args.config
    try:
        convert(
            args.src,
            args.dst,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=False if args.quiet else None,
            quantize=args.quantize,
            **options,
        )
    except (
        CheckpointError, CheckpointFormatError, UnknownModelError, QuantizationError, json.JSONDecodeError
    ) as err:  # fmt: skip
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:  # bad shapes/values in the source, unreadable files
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except TypeError as err:
        if "unexpected keyword" in str(err):
            print(f"error: option not supported for this checkpoint format ({err})", file=sys.stderr)
            return 2
        raise
    print(f"wrote {args.dst}")
    return 0


def main() -> None:
    sys.exit(run())


class _CallableModule(types.ModuleType):
    # `import vishwam_jax.convert` rebinds the package attribute `vishwam_jax.convert` from the library
    # function to this module; making the module callable keeps `vj.convert(src, dst)` working after it.
    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    main()
