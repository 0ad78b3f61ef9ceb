"""Tokenizers: SentencePiece (`tokenizer.model`), HuggingFace `tokenizer.json`, and raw bytes for
the embedded demo models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; the ids above are the model's special tokens."""

    def __init__(self, bos_id: int | None = None, add_bos: bool = False):
        self.bos_id, self.add_bos = bos_id, add_bos

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, path: str | Path, add_bos: bool = True):
        import sentencepiece

        self.path = Path(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path} is not a valid SentencePiece model: {err}") from None
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        if self.add_bos and self._sp.bos_id() >= 0:
            ids = [self._sp.bos_id()] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


class HFTokenizer:
    """A `tokenizer.json` (the `tokenizers` library); its post-processor adds BOS where the model wants it."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(config, directory: str | Path | None = None) -> Tokenizer | None:
    """The tokenizer a model uses: bytes for demo models, else the files in its directory."""
    add_bos = bool(config.get("add_bos", True))
    if config.get("tokenizer") == "bytes":
        return ByteTokenizer(config.get("bos_token_id"), add_bos=False)
    if directory is None:
        return None
    directory = Path(directory)
    if (directory / "tokenizer.model").exists():
        return SentencePieceTokenizer(directory / "tokenizer.model", add_bos=add_bos)
    if (directory / "tokenizer.json").exists():
        return HFTokenizer(directory / "tokenizer.json")
    return None


def tokenizer_from_file(path: str | Path, config) -> Tokenizer:
    """A SentencePiece `*.model` or a `tokenizer.json`, checked against the model's vocabulary (ids
    past it would be silently clamped by the embedding lookup)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer file {path} does not exist")
    if path.suffix == ".json":
        tok = HFTokenizer(path)
    else:
        tok = SentencePieceTokenizer(path, add_bos=bool(config.get("add_bos", True)))
    if tok.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocabulary has {config.vocab_size}"
        )
    return tok
