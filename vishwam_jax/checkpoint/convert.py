"""`convert(src, dst)`: detect the source format and stream it into a model directory."""

from __future__ import annotations

import importlib
from pathlib import Path

from vishwam_jax.checkpoint.orbax_io import CheckpointError, writer_progress
from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError
from vishwam_jax.quantization import check_format

# One module per source format, each with detect(src) -> bool and convert(src, dst, **options).
_FORMATS = (
    "vishwam_jax.checkpoint.hf_gemma",
    "vishwam_jax.checkpoint.hf_deepseek",
    "vishwam_jax.checkpoint.grok_release",
    "vishwam_jax.checkpoint.hf_grok",
)


def _format_modules():
    for name in _FORMATS:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype=None,
    overwrite: bool = False,
    progress: bool | None = None,
    quantize: str | None = None,
    **options,
) -> Path:
    """Convert the checkpoint at `src` (format auto-detected) into the model directory `dst`.

    dtype: storage dtype of floating weights (default: the source's, float8 sources -> bfloat16).
    progress: a tqdm bar on stderr over the parameters written (None: only when stderr is a terminal).
    quantize: "int8" or "fp8" to store the matmul weights quantized (vishwam_jax/quantization; the
      directory's config.json records it). DeepSeek-V3's FP8 release with "fp8" keeps its float8
      weights and block scales as they are; Grok-1's release with "int8" keeps its int8 values where
      their scales are per output channel. Norms, routers, embeddings stay float.
    Other keyword options are passed to the format's converter (e.g. `config=` for the Grok-1 release).
    """
    if quantize is not None:
        check_format(quantize)
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.exists():
        raise CheckpointError(f"source checkpoint {src} does not exist")
    if not src.is_dir():
        raise CheckpointError(f"source checkpoint {src} is not a directory")
    if src.resolve() == dst.resolve():
        raise CheckpointError("source and destination are the same directory")
    for module in _format_modules():
        if module.detect(src):
            with writer_progress(progress):
                module.convert(src, dst, dtype=dtype, overwrite=overwrite, quantize=quantize, **options)
            return dst
    raise CheckpointFormatError(
        f"{src} is not a checkpoint format vishwam_jax can convert (expected a HuggingFace directory with "
        "config.json + *.safetensors for Gemma/DeepSeek-V3, or the Grok-1 release's ckpt-0/ directory)"
    )
