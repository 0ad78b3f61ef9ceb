"""The converter: bounded memory, atomic output, clear errors for bad input."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

import vishwam_jax as vj
from vishwam_jax.checkpoint import orbax_io
from vishwam_jax.checkpoint.orbax_io import CheckpointError
from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError


def write_hf_gemma(path, *, vocab=64, d=32, layers=2, heads=2, kv=1, head_dim=16, ffn=48, seed=0, shards=1):
    """A HuggingFace-layout Gemma checkpoint written with numpy only (no torch)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(
        model_type="gemma",
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=ffn,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    )
    (path / "config.json").write_text(json.dumps(config))
    r = lambda *s: rng.standard_normal(s, dtype=np.float32) * 0.1
    tensors = {"model.embed_tokens.weight": r(vocab, d), "model.norm.weight": r(d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "input_layernorm.weight": r(d),
                p + "post_attention_layernorm.weight": r(d),
                p + "self_attn.q_proj.weight": r(heads * head_dim, d),
                p + "self_attn.k_proj.weight": r(kv * head_dim, d),
                p + "self_attn.v_proj.weight": r(kv * head_dim, d),
                p + "self_attn.o_proj.weight": r(d, heads * head_dim),
                p + "mlp.gate_proj.weight": r(ffn, d),
                p + "mlp.up_proj.weight": r(ffn, d),
                p + "mlp.down_proj.weight": r(d, ffn),
            }
        )
    names = sorted(tensors)
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    return tensors


def test_sharded_checkpoint_converts_exactly(tmp_path):
    tensors = write_hf_gemma(tmp_path / "hf", shards=3)
    vj.convert(tmp_path / "hf", tmp_path / "out")
    params = orbax_io.restore_params(tmp_path / "out")
    np.testing.assert_array_equal(params["embed"]["embedding"], tensors["model.embed_tokens.weight"])
    # Gemma 1 has no local layers: one period of one layer, stacked over the 2 layers.
    layers = params["blocks"]["layers"][0]
    q = tensors["model.layers.1.self_attn.q_proj.weight"]  # [h*hd, d] -> [d, h, hd]
    np.testing.assert_array_equal(layers["attn"]["q"]["kernel"][1], q.T.reshape(32, 2, 16))
    np.testing.assert_array_equal(layers["mlp"]["down"]["kernel"][0], tensors["model.layers.0.mlp.down_proj.weight"].T)
    # Gemma 1 names the pre-MLP norm "post_attention_layernorm".
    np.testing.assert_array_equal(
        layers["mlp_norm"]["scale"][0], tensors["model.layers.0.post_attention_layernorm.weight"]
    )


def test_bfloat16_storage(tmp_path):
    write_hf_gemma(tmp_path / "hf")
    vj.convert(tmp_path / "hf", tmp_path / "out", dtype="bfloat16")
    shapes = orbax_io.param_shapes(tmp_path / "out")
    assert {str(s.dtype) for s in __import__("jax").tree_util.tree_leaves(shapes)} == {"bfloat16"}


def _peak_rss_mb(code: str) -> float:
    script = (
        textwrap.dedent(code) + "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_peak_memory_stays_near_one_tensor(tmp_path):
    # ~520 MB of weights in 25 tensors; the largest (each MLP matrix) is 32 MB.
    tensors = write_hf_gemma(
        tmp_path / "hf", vocab=4096, d=1024, layers=5, heads=8, kv=8, head_dim=128, ffn=8192, shards=2
    )
    total_mb = sum(t.nbytes for t in tensors.values()) / 2**20
    largest_mb = max(t.nbytes for t in tensors.values()) / 2**20
    del tensors
    imports = "import vishwam_jax, vishwam_jax.checkpoint.hf_gemma, orbax.checkpoint, tensorstore"
    baseline = _peak_rss_mb(imports)
    peak = _peak_rss_mb(f"{imports}\nvishwam_jax.convert({str(tmp_path / 'hf')!r}, {str(tmp_path / 'out')!r})")
    assert total_mb > 500
    assert peak - baseline < 4 * largest_mb, (peak, baseline, largest_mb, total_mb)


def test_interrupted_conversion_leaves_nothing_that_loads(tmp_path, monkeypatch):
    write_hf_gemma(tmp_path / "hf")
    calls = {"n": 0}
    original = orbax_io.CheckpointWriter.create

    def failing_create(self, path, shape, dtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return original(self, path, shape, dtype)

    monkeypatch.setattr(orbax_io.CheckpointWriter, "create", failing_create)
    with pytest.raises(OSError, match="simulated"):
        vj.convert(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the temporary directory is removed too


def test_save_params_sharded_tree_and_interrupted_save(tmp_path, monkeypatch):
    """An in-memory tree sharded over 8 devices (Orbax writes it shard by shard) restores equal (bfloat16
    and int8 kept); a save that fails after the arrays are written leaves nothing that loads, and
    overwrite replaces an existing directory."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    rng = np.random.default_rng(0)
    host = {
        "embed": rng.standard_normal((40, 6)).astype(np.float32),
        "layers": [
            {"w": rng.standard_normal((8, 6)).astype(jnp.bfloat16)},
            {"q": rng.integers(-127, 127, (4, 6)).astype(np.int8)},
        ],
        "scale": np.float32(0.5),
    }
    specs = {"embed": P("a", "b"), "layers": [{"w": P(None, "b")}, {"q": P("a")}], "scale": P()}
    params = jax.tree_util.tree_map(lambda x, s: jax.device_put(jnp.asarray(x), NamedSharding(mesh, s)), host, specs)
    config = vj.get_config("gemma3-tiny", num_layers=7)

    orbax_io.save_params(tmp_path / "m", params, config)
    restored = orbax_io.restore_params(tmp_path / "m")
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(host)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(host)):
        assert a.dtype == np.asarray(b).dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert orbax_io.read_config(tmp_path / "m") == config  # derived fields (layer_types) recomputed alike
    with pytest.raises(CheckpointError, match="already exists"):
        orbax_io.save_params(tmp_path / "m", params, config)

    (tmp_path / "tokenizer.model").write_bytes(b"tok")

    def failing_copy(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(orbax_io.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="simulated"):
        orbax_io.save_params(tmp_path / "n", params, config, files=(tmp_path / "tokenizer.model",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "tokenizer.model"]  # no partial directory left
    monkeypatch.undo()

    doubled = jax.tree_util.tree_map(lambda x: x * 2 if x.dtype != jnp.int8 else x, params)
    orbax_io.save_params(tmp_path / "m", doubled, config, overwrite=True, files=(tmp_path / "tokenizer.model",))
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == b"tok"
    np.testing.assert_array_equal(np.asarray(orbax_io.restore_params(tmp_path / "m")["embed"]), 2 * host["embed"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "tokenizer.model"]


def test_killed_conversion_is_not_a_model(tmp_path):
    """A process killed mid-way cannot clean up: what it leaves must be refused by `load`."""
    write_hf_gemma(tmp_path / "hf")
    vj.convert(tmp_path / "hf", tmp_path / "out")
    (tmp_path / "out" / orbax_io.COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match="not a complete vishwam_jax model directory"):
        vj.load(tmp_path / "out")


def test_existing_destination_is_not_overwritten_by_default(tmp_path):
    write_hf_gemma(tmp_path / "hf")
    vj.convert(tmp_path / "hf", tmp_path / "out")
    with pytest.raises(CheckpointError, match="already exists"):
        vj.convert(tmp_path / "hf", tmp_path / "out")
    vj.convert(tmp_path / "hf", tmp_path / "out", overwrite=True)


def test_missing_source(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        vj.convert(tmp_path / "nope", tmp_path / "out")


def test_unrecognised_source(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointFormatError, match="not a checkpoint format"):
        vj.convert(tmp_path / "src", tmp_path / "out")


def test_truncated_safetensors(tmp_path):
    write_hf_gemma(tmp_path / "hf")
    f = next((tmp_path / "hf").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        vj.convert(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_tensor(tmp_path):
    write_hf_gemma(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match="mlp.gate_proj.weight: shape"):
        vj.convert(tmp_path / "hf", tmp_path / "out")


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gemma-3b'.*did you mean"):
        vj.load("gemma-3b")
    with pytest.raises(CheckpointError, match="does not exist"):
        vj.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a complete"):
        vj.load(tmp_path / "empty")


def test_corrupt_params_are_reported(tmp_path):
    write_hf_gemma(tmp_path / "hf")
    vj.convert(tmp_path / "hf", tmp_path / "out")
    (tmp_path / "out" / "params" / "embed.embedding" / ".zarray").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        vj.load(tmp_path / "out")


def test_convert_stays_callable_after_the_cli_module_is_imported(tmp_path):
    # Importing the `python -m vishwam_jax.convert` module rebinds the package attribute of the same name.
    import vishwam_jax.convert as cli

    tensors = write_hf_gemma(tmp_path / "hf")
    vj.convert(tmp_path / "hf", tmp_path / "out")
    np.testing.assert_array_equal(
        orbax_io.restore_params(tmp_path / "out")["embed"]["embedding"], tensors["model.embed_tokens.weight"]
    )
    assert cli.run([str(tmp_path / "hf"), str(tmp_path / "out")]) == 2  # exists, no --overwrite: one-line error


def test_overwrite_never_deletes_what_is_not_a_model_directory(tmp_path):
    write_hf_gemma(tmp_path / "hf")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(CheckpointError, match="not a vishwam_jax model directory"):
        vj.convert(tmp_path / "hf", tmp_path / "photos", overwrite=True)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"
    (tmp_path / "empty").mkdir()  # an empty directory may be replaced
    vj.convert(tmp_path / "hf", tmp_path / "empty", overwrite=True)
    vj.load(tmp_path / "empty")


def test_paths_with_a_tilde_are_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    write_hf_gemma(tmp_path / "hf")
    vj.convert("~/hf", "~/models/g")
    assert (tmp_path / "models" / "g" / orbax_io.COMPLETE_MARKER).exists() and not (tmp_path / "~").exists()
    assert vj.load("~/models/g").config.family == "gemma"


def _damage(file, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        file.write_bytes(b"")
    else:  # overwritten with random bytes of the same length
        file.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())


@pytest.mark.parametrize("how", ["truncated", "empty", "random"])
def test_damaged_weight_file_is_a_typed_error_naming_it(tmp_path, how):
    from vishwam_jax.checkpoint.orbax_io import CorruptCheckpointError

    write_hf_gemma(tmp_path / "hf")
    vj.convert(tmp_path / "hf", tmp_path / "m")
    chunk = next(f for f in (tmp_path / "m" / "params" / "embed.embedding").iterdir() if not f.name.startswith("."))
    _damage(chunk, how)
    with pytest.raises(CorruptCheckpointError) as info:
        vj.load(tmp_path / "m")
    message = str(info.value)
    assert isinstance(info.value, CheckpointError) and info.value.path == str(chunk)
    assert message.startswith(f"{chunk}: damaged weight file") and "\n" not in message and len(message) < 400, message


@pytest.mark.parametrize("how", ["truncated", "empty", "random"])
def test_damaged_safetensors_file_is_named(tmp_path, how):
    write_hf_gemma(tmp_path / "hf")
    f = next((tmp_path / "hf").glob("*.safetensors"))
    _damage(f, how)
    with pytest.raises(CheckpointFormatError, match=re.escape(str(f))):
        vj.convert(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "header",
    [
        b"[1, 2]",
        b'{"w": [1]}',
        b'{"w": {"dtype": "F32", "shape": [2]}}',
        b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}',
    ],
)
def test_random_bytes_that_parse_as_a_header_are_refused(tmp_path, header):
    # Damage can leave bytes that are valid JSON but not a safetensors header.
    write_hf_gemma(tmp_path / "hf")
    f = next((tmp_path / "hf").glob("*.safetensors"))
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    with pytest.raises(CheckpointFormatError, match="corrupt safetensors header"):
        vj.convert(tmp_path / "hf", tmp_path / "out")


def test_convert_progress_counts_every_tensor(tmp_path, capsys):
    tensors = write_hf_gemma(tmp_path / "hf")
    vj.convert(tmp_path / "hf", tmp_path / "quiet", progress=False)
    assert "converting" not in capsys.readouterr().err
    vj.convert(tmp_path / "hf", tmp_path / "m", progress=True)
    last = capsys.readouterr().err.split("\r")[-1]
    # Gemma ties the output to the embedding: every source tensor is one written tensor.
    total = sum(t.size for t in tensors.values())
    assert "converting m: 100%" in last and f"{len(tensors)} tensors" in last, last
    assert f"{total / 1000:.1f}k/{total / 1000:.1f}k" in last, last
