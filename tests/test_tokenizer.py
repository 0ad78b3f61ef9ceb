from pathlib import Path

import pytest

from vishwam_jax.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer

GROK_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "grok1-tokenizer.model"


def test_bytes_roundtrip_unicode():
    tok = ByteTokenizer()
    text = "Thou art — più bella ☼"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256


def test_bytes_decode_skips_special_ids():
    assert ByteTokenizer().decode([72, 257, 105, 256]) == "Hi"


@pytest.mark.skipif(not GROK_TOKENIZER.exists(), reason="shared Grok-1 tokenizer not present")
def test_sentencepiece_grok_tokenizer():
    tok = SentencePieceTokenizer(GROK_TOKENIZER, add_bos=False)
    assert tok.vocab_size == 131072
    ids = tok.encode("The answer to life, the universe, and everything")
    assert tok.decode(ids) == "The answer to life, the universe, and everything"
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["[PAD]", "[BOS]", "[EOS]"]


def test_sentencepiece_rejects_garbage(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        SentencePieceTokenizer(bad)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "to": 1, "be": 2, "or": 3, "not": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert tok.encode("to be or not to be") == [1, 2, 3, 4, 1, 2]
