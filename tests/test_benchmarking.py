"""The ceilings every benchmark divides by, and the transformers peer's configuration of our presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import vishwam_jax as vj
from vishwam_jax.checkpoint.hf_gemma import config_from_hf, config_to_hf
from vishwam_jax.presets import get_config, to_dict
from vishwam_jax.utils import benchmarking


def test_stream_read_kernel_reads_every_row():
    # Interpret mode runs the GPU/TPU kernel's program logic on the CPU: every block must be summed once.
    x = jax.random.normal(jax.random.key(0), (3 * 256, 512), jnp.bfloat16)
    out = benchmarking.stream_read(x, rows_per_program=256, rows_per_step=32, interpret=True)
    expected = np.asarray(x, np.float32).reshape(3, 256, 512).sum(1)
    assert out.shape == (3, 8, 512)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(expected[:, None], (3, 8, 512)), rtol=1e-5, atol=1e-3)


def test_stream_read_refuses_a_shape_it_would_read_partly():
    with pytest.raises(ValueError, match="stream_read needs"):
        benchmarking.stream_read(jnp.zeros((1000, 512), jnp.bfloat16), rows_per_program=256)


def test_read_bandwidth_on_cpu_is_the_xla_reduction_and_has_no_spec():
    bw = benchmarking.read_bandwidth(8 << 20)
    assert bw.pallas_stream is None and bw.spec is None  # no native Pallas lowering, no datasheet for a CPU
    assert bw.bytes_per_s == bw.xla_reduction > 0
    assert "read bandwidth" in bw.describe()


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("NVIDIA H200", 4.8e12),
        ("NVIDIA H100 80GB HBM3", 3.35e12),
        ("TPU v5p", 2.765e12),
        ("TPU v5 lite", 0.819e12),
        ("cpu", None),
    ],
)
def test_spec_bandwidth_by_device_kind(kind, spec):
    assert benchmarking.spec_bandwidth(kind) == spec


@pytest.mark.parametrize("name", [n for n in vj.list_models() if n.startswith("gemma")])
def test_gemma_config_round_trips_through_transformers(name):
    """The peer benchmark builds transformers' model from config_to_hf: it must be our architecture, field
    for field (transformers' own config class validates it on the way)."""
    config = get_config(name)
    hf = transformers.AutoConfig.for_model(**config_to_hf(config))
    back = to_dict(config_from_hf(hf.to_dict()))
    ours = to_dict(config)
    differing = {k for k in ours if ours[k] != back.get(k)} - {"tokenizer"}  # not a transformers field
    assert not differing, {k: (ours[k], back.get(k)) for k in differing}
