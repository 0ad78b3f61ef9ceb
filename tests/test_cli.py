"""The command-line entry points end to end (subprocesses, as a user runs them)."""

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
    common = {"the", "and", "i", "to", "of", "a", "my", "you", "that", "in", "is", "not", "me", "it", "with",
              "be", "your", "his", "this", "he", "but", "have", "for", "thou", "so", "will", "what", "thy", "all",
              "her", "no", "by", "do", "shall", "if", "are", "we", "thee", "our", "on", "lord", "good", "now", "o"}
    assert len(words) > 15 and sum(w in common for w in words) / len(words) > 0.2, text
    assert "prefill" in r.stderr and "decode" in r.stderr and "tok/s" in r.stderr


def test_generate_batched_prompts_and_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("ROMEO.\nJULIET.\n")
    r = run("vishwam_jax.generate", "--prompt-file", str(f), "--prompt", "HAMLET.", "--max-new-tokens", "20",
            "--temperature", "0")
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
