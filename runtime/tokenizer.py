"""Text in and out of an artifact: the tokenizer its manifest describes (artifact.TokenizerInfo).

Two implementations of one interface: `ByteTokenizer` (the reference model's tokens are the UTF-8
bytes of the text) and `HFTokenizer` (a Hugging Face `tokenizer.json`, run by the `tokenizers`
package: Rust, no torch, wheels for aarch64). Chat templates are rendered with Jinja2 the way
transformers' `apply_chat_template` renders them (sandboxed, trim_blocks and lstrip_blocks, the
same helpers), from the template and special tokens the compiler recorded in the manifest.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from moetvm.artifact import ArtifactError, Manifest, read_verified
from moetvm.errors import MoetvmError


class TokenizerError(MoetvmError, ValueError):
    """Text the tokenizer cannot take, or a chat the template refuses."""


class Tokenizer:
    """The interface: text <-> token ids, the ids that end a generation, the chat template."""

    eos_token_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    special_tokens: dict = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        """The text of `ids`, special tokens left out (what a user reads)."""
        raise NotImplementedError

    def decoder(self) -> "IncrementalDecoder":
        """A decoder fed one id at a time that returns the text each id completes."""
        return IncrementalDecoder(self)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, as transformers' apply_chat_template renders it."""
        if not self.chat_template:
            raise TokenizerError("this artifact's tokenizer has no chat template (its model directory had none)")
        _check_messages(messages)
        try:
            return _compiled(self.chat_template).render(messages=messages, tools=None, documents=None,
                                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TokenizerError:
            raise
        except Exception as e:  # noqa: BLE001 - a template's own raise_exception or a render failure
            raise TokenizerError(f"the chat template refused the messages: {e}") from None

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The token ids of a conversation's prompt: the template writes any special tokens itself,
        so none are added (as apply_chat_template(tokenize=True))."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class ByteTokenizer(Tokenizer):
    """Token id = byte value: the reference model's 256-token vocabulary."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise TokenizerError(f"not valid UTF-8 text ({e.reason})") from None

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (tokenizer.json) from the bytes the manifest verified."""

    def __init__(self, text: str, eos_token_ids=(), chat_template: str | None = None, special_tokens: dict | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tokenizer = RustTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - the library raises its own exception types
            raise ArtifactError(f"tokenizer.json: not a readable tokenizer ({' '.join(str(e).split())})") from None
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"a prompt must be text, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def decoder(self) -> "IncrementalDecoder":
        return _StreamDecoder(self)


class IncrementalDecoder:
    """Decodes the growing sequence and returns what is new, holding back a trailing replacement
    character: an id may end in the middle of a character whose other bytes come next."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def finish(self) -> str:
        """What is still held back, as decode() shows it: the whole text is then decode(ids)."""
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


class _StreamDecoder(IncrementalDecoder):
    """tokenizers' own DecodeStream for the steps: the same contract, without re-decoding the
    whole sequence per token."""

    def __init__(self, tokenizer: HFTokenizer):
        from tokenizers.decoders import DecodeStream

        super().__init__(tokenizer)
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        new = self._stream.step(self.tokenizer._tokenizer, int(token_id)) or ""
        self.emitted += len(new)
        return new


def load_tokenizer(root: Path, manifest: Manifest, verify: bool = True) -> Tokenizer | None:
    """The artifact's tokenizer, or None when it ships none (a model compiled without one: ids only)."""
    info = manifest.tokenizer
    if info is None:
        return None
    if info.kind == "bytes":
        return ByteTokenizer()
    data = read_verified(Path(root), info.files[0], verify)  # exactly the bytes verified
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"{info.files[0].path}: not UTF-8 text") from None
    return HFTokenizer(text, info.eos_token_ids, info.chat_template, info.special_tokens)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TokenizerError(f"messages[{i}] must be an object with a string role and string content")


_TEMPLATES: dict[str, object] = {}


def _compiled(template: str):
    """The Jinja2 template, compiled once, in the environment transformers renders chat templates in."""
    if template not in _TEMPLATES:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TokenizerError(f"the chat template refused the messages: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # Jinja's own tojson escapes HTML characters; transformers' does not.
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            _TEMPLATES[template] = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ArtifactError(f"the artifact's chat template does not parse ({e})") from None
    return _TEMPLATES[template]
