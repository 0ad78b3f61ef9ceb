"""The command-line entry points end to end (subprocesses, as a user runs them)."""

import socket
import subprocess
import sys

import pytest
from test_convert import write_hf_gemma


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_with_embedded_default_looks_like_shakespeare():
    r = run("vishwam_jax.generate", "--prompt", "KING HENRY.\n", "--max-new-tokens", "160", "--seed", "0")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.startswith("KING HENRY.\n")
    words = [w.strip(".,;:!?'\"-").lower() for w in text.split()]
    words = [w for w in words if w.isalpha()]
    common = {
        "the",
        "and",
        "i",
        "to",
        "of",
        "a",
        "my",
        "you",
        "that",
        "in",
        "is",
        "not",
        "me",
        "it",
        "with",
        "be",
        "your",
        "his",
        "this",
        "he",
        "but",
        "have",
        "for",
        "thou",
        "so",
        "will",
        "what",
        "thy",
        "all",
        "her",
        "no",
        "by",
        "do",
        "shall",
        "if",
        "are",
        "we",
        "thee",
        "our",
        "on",
        "lord",
        "good",
        "now",
        "o",
    }
    assert len(words) > 15 and sum(w in common for w in words) / len(words) > 0.2, text
    assert "prefill" in r.stderr and "decode" in r.stderr and "tok/s" in r.stderr


def test_generate_batched_prompts_and_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("ROMEO.\nJULIET.\n")
    r = run(
        "vishwam_jax.generate",
        "--prompt-file",
        str(f),
        "--prompt",
        "HAMLET.",
        "--max-new-tokens",
        "20",
        "--temperature",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("=== ") == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gemma-99b"], "unknown model"),
        (["--model", "/nonexistent/ckpt"], "does not exist"),
        (["--prompt", "x" * 2000], "exceeds the model's context"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "0"], "--top-k"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        # A preset without tokenizer files is refused before its weights are built.
        (["--model", "gemma-2b"], "pass one with --tokenizer"),
    ],
)
def test_generate_bad_input_is_one_line_and_exit_2(args, message):
    r = run("vishwam_jax.generate", *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "x" * 100 not in r.stdout  # a prompt too long for the context is not echoed first


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mesh", "bogus=2"], "bad mesh entry"),
        (["--mesh", "tensor=3"], "needs 3 devices"),
        (["--lookahead", "-1"], "lookahead"),
        (["--slots", "3"], "num_slots"),
    ],
)
def test_serve_bad_options_are_one_line_and_exit_2(args, message):
    r = run("vishwam_jax.serve", *args, "--port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


@pytest.mark.parametrize("layout", [[], ["--one-process"]])
def test_serve_on_a_taken_port_exits_2_naming_it_before_loading_the_model(layout):
    """Both layouts bind (or try) before the model loads: one line naming the address, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("vishwam_jax.serve", "--port", str(port), "--no-warmup", *layout)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1, r.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: " in r.stderr
    assert "address already in use" in r.stderr.lower()


def test_help_shows_defaults():
    assert "(default: 200)" in run("vishwam_jax.generate", "--help").stdout


def test_convert_prints_no_orbax_ocdbt_warning(tmp_path):
    write_hf_gemma(tmp_path / "hf")
    r = run("vishwam_jax.convert", str(tmp_path / "hf"), str(tmp_path / "m"))
    assert r.returncode == 0 and "OCDBT" not in r.stderr, r.stderr[-2000:]


def test_generate_corrupt_checkpoint(tmp_path):
    write_hf_gemma(tmp_path / "hf")
    assert run("vishwam_jax.convert", str(tmp_path / "hf"), str(tmp_path / "m")).returncode == 0
    (tmp_path / "m" / "config.json").write_text("{")
    r = run("vishwam_jax.generate", "--model", str(tmp_path / "m"))
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_convert_cli(tmp_path):
    write_hf_gemma(tmp_path / "hf")
    r = run("vishwam_jax.convert", str(tmp_path / "hf"), str(tmp_path / "m"), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    r = run("vishwam_jax.convert", str(tmp_path / "hf"), str(tmp_path / "m"))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run("vishwam_jax.convert", str(tmp_path / "nothing"), str(tmp_path / "m2"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert "trust" in run("vishwam_jax.convert", "--help").stdout


def test_streaming_holds_back_a_character_split_between_blocks():
    from vishwam_jax.generate import StreamedText
    from vishwam_jax.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ids = list("née 日本".encode())
    shown, out = StreamedText(), ""
    for cut in range(1, len(ids) + 1):  # one byte per streamed block: every split point
        out += shown.update(tok.decode(ids[:cut]))
    out += shown.update(tok.decode(ids), final=True)
    assert out == "née 日本"
    assert StreamedText().update(tok.decode(list(b"ab\xe6")), final=True) == "ab\ufffd"  # a real trailing error shows


def test_damaged_weight_file_is_one_line_and_exit_2(tmp_path):
    from test_convert import _damage

    write_hf_gemma(tmp_path / "hf")
    assert run("vishwam_jax.convert", str(tmp_path / "hf"), str(tmp_path / "m")).returncode == 0
    chunk = tmp_path / "m" / "params" / "embed.embedding" / "0.0"
    original = chunk.read_bytes()
    for how in ("truncated", "empty", "random"):
        chunk.write_bytes(original)
        _damage(chunk, how)
        r = run("vishwam_jax.generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "2")
        assert r.returncode == 2, (how, r.returncode, r.stderr[-2000:])
        assert r.stderr.count("\n") == 1 and f"{chunk}: damaged weight file" in r.stderr, r.stderr
    # A damaged source file given to convert: the same treatment.
    src = next((tmp_path / "hf").glob("*.safetensors"))
    src.write_bytes(b"\x10\0\0\0\0\0\0\0" + b'{"w": [1, 2, 3]}')
    r = run("vishwam_jax.convert", str(tmp_path / "hf"), str(tmp_path / "m2"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(src) in r.stderr, r.stderr[-2000:]


def test_gemma_shakespeare_names_the_trained_model(capsys):
    import numpy as np

    import vishwam_jax as vj
    from vishwam_jax.generate import run as generate

    assert generate(["--list"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "trained weights" in listed["gemma-shakespeare"] and "random weights" in listed["gemma-tiny"]
    named, default = vj.load("gemma-shakespeare"), vj.load(vj.DEFAULT_MODEL_DIR)
    for a, b in zip(jax_leaves(named.params), jax_leaves(default.params)):
        np.testing.assert_array_equal(a, b)
    # The preset's config still initialises randomly (training from scratch, as scripts/train_demo.py does).
    fresh = vj.load(vj.get_config("gemma-shakespeare"))
    assert not np.array_equal(jax_leaves(fresh.params)[0], jax_leaves(default.params)[0])


def jax_leaves(tree):
    import jax
    import numpy as np

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_generate_progress_line_leaves_the_results_alone(capsys):
    from vishwam_jax.generate import run as generate

    common = ["--prompt", "ROMEO.", "--prompt", "JULIET.\n", "--max-new-tokens", "40", "--temperature", "0"]
    assert generate(common + ["--no-progress"]) == 0
    plain = capsys.readouterr()
    assert generate(common + ["--progress"]) == 0
    shown = capsys.readouterr()
    assert shown.out == plain.out and "\r" not in plain.err
    assert "[compiling prefill" in shown.err and "[compiling decode" in shown.err, shown.err
    statuses = [s for s in shown.err.split("\r") if s.startswith("[decoding")]
    assert statuses[0].startswith("[decoding: 16/40 tokens per row") and "tok/s" in statuses[-1], statuses
    assert statuses[-1].startswith("[decoding: 40/40 tokens per row"), statuses
    # Streaming a single prompt: the prompt is printed after compiling, the text is the same.
    single = ["--prompt", "ROMEO.", "--max-new-tokens", "24", "--temperature", "0"]
    assert generate(single + ["--no-progress"]) == 0
    plain = capsys.readouterr()
    assert generate(single + ["--progress"]) == 0
    shown = capsys.readouterr()
    assert shown.out == plain.out and shown.out.startswith("ROMEO.") and "[compiling" in shown.err


def test_decode_progress_counts_tokens_and_rate():
    import numpy as np

    from vishwam_jax.generate import DecodeProgress

    times = iter([10.0, 12.0, 13.0])
    p = DecodeProgress(rows=2, max_new_tokens=20, pad_id=0, clock=lambda: next(times))
    assert p.update(np.ones((2, 8), np.int32)) == "[decoding: 8/20 tokens per row, 16 tokens over 2 rows]"
    assert p.update(np.ones((2, 8), np.int32)).endswith("32 tokens over 2 rows, 8.0 tok/s]")
    # The last block runs past max_new_tokens; a finished row emits padding, which is no token.
    last = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [0] * 8], np.int32)
    assert p.update(last) == "[decoding: 20/20 tokens per row, 36 tokens over 2 rows, 6.7 tok/s]"


def test_convert_progress_only_on_a_terminal(tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios
    import threading

    write_hf_gemma(tmp_path / "hf")
    r = run("vishwam_jax.convert", str(tmp_path / "hf"), str(tmp_path / "piped"))
    assert r.returncode == 0 and "converting" not in r.stderr, r.stderr

    def on_a_terminal(*extra):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
        chunks = []
        reader = threading.Thread(target=lambda: _drain(master, chunks), daemon=True)
        reader.start()
        p = subprocess.run(
            [sys.executable, "-m", "vishwam_jax.convert", str(tmp_path / "hf"), *extra],
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=300,
        )
        os.close(slave)
        reader.join(10)
        os.close(master)
        return p.returncode, b"".join(chunks).decode(errors="replace")

    code, err = on_a_terminal(str(tmp_path / "tty"))
    assert code == 0 and "converting tty: 100%" in err and "20 tensors" in err, err
    code, err = on_a_terminal(str(tmp_path / "quiet"), "--quiet")
    assert code == 0 and "converting" not in err, err


def _drain(fd, chunks):
    import os

    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the pty's other end closed
            return
        if not data:
            return
        chunks.append(data)
