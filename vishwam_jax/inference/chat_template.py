"""Chat messages to prompt text: the model's own template where its directory has one
(`tokenizer_config.json`'s "chat_template", Jinja, as HuggingFace ships it), else a plain transcript.

The plain fallback (models without a template, e.g. the embedded Shakespeare model):

    System: You are terse.

    User: Hello

    Assistant:
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


class ChatTemplate:
    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
        """source: a Jinja chat template (None: the plain transcript)."""
        self.source = source
        self._bos, self._eos = bos_token, eos_token
        self._template = None
        if source is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment  # the template is data, not trusted code

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(source)

    @classmethod
    def from_directory(cls, directory: str | Path | None) -> ChatTemplate:
        """The template in `directory`/tokenizer_config.json, or the plain transcript."""
        path = None if directory is None else Path(directory).expanduser() / "tokenizer_config.json"
        if path is None or not path.is_file():
            return cls()
        config = json.loads(path.read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        token = lambda v: v if isinstance(v, str) else (v or {}).get("content", "")  # noqa: E731
        return cls(source, token(config.get("bos_token")), token(config.get("eos_token")))

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """Prompt text that ends where the assistant's reply begins. A leading BOS string is left
        out: the tokenizer adds BOS itself."""
        if self._template is None:
            turns = [f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages]
            return "".join(turns) + "Assistant:"
        text = self._template.render(
            messages=list(messages), add_generation_prompt=True, bos_token=self._bos, eos_token=self._eos
        )
        return text[len(self._bos) :] if self._bos and text.startswith(self._bos) else text


def _raise(message: str):
    raise ValueError(message)
