"""The tokenizer a compiled LM ships with (the artifact's `tokenizer` section, read by
runtime/tokenizer.py): found in the model's directory, checked against the model, its facts
(end-of-sequence ids, special tokens, chat template) read once, its files copied as they are."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from moetvm.artifact import TokenizerInfo, file_ref
from moetvm.errors import UsageError

TOKENIZER_JSON = "tokenizer.json"
# Copied beside it when present: what transformers saves with a tokenizer, and the generation
# defaults (their eos_token_id ends generation).
COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
ARTIFACT_FOLDER = "tokenizer"


class TokenizerSourceError(UsageError):
    """A model directory's tokenizer that cannot serve the model."""


@dataclass(frozen=True)
class TokenizerSource:
    kind: str  # "bytes" | "hf" (artifact.TOKENIZER_KINDS)
    files: tuple[Path, ...] = ()  # hf: tokenizer.json, then its companions
    eos_token_ids: tuple[int, ...] = ()
    special_tokens: dict = field(default_factory=dict)
    chat_template: str | None = None

    @classmethod
    def bytes(cls) -> "TokenizerSource":
        return cls("bytes")

    @classmethod
    def from_directory(cls, folder: str | Path, vocab_size: int, model_config: dict | None = None) -> "TokenizerSource | None":
        """The Hugging Face tokenizer in `folder` (None when it has no tokenizer.json: the artifact
        then takes token ids only). TokenizerSourceError when it does not fit the model."""
        folder = Path(folder)
        if not (folder / TOKENIZER_JSON).is_file():
            return None
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_JSON))
        except Exception as e:  # noqa: BLE001 - the library raises its own exception types
            raise TokenizerSourceError(f"{folder / TOKENIZER_JSON}: not a readable tokenizer ({' '.join(str(e).split())})") from None
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise TokenizerSourceError(f"{folder / TOKENIZER_JSON}: {size} tokens, more than the model's vocabulary of "
                                       f"{vocab_size}: it would make ids the model has no embedding for")
        config = _json(folder / "tokenizer_config.json")
        special = {**_json(folder / "special_tokens_map.json"), **config}
        special_tokens = {k: text for k in SPECIAL_TOKENS if (text := _token_text(special.get(k))) is not None}
        template = _chat_template(folder, config)
        eos = _eos_ids(folder, model_config or _json(folder / "config.json"), tokenizer, special_tokens.get("eos_token"))
        bad = [i for i in eos if not 0 <= i < vocab_size]
        if bad:
            raise TokenizerSourceError(f"{folder}: end-of-sequence ids {bad} are outside the model's vocabulary of {vocab_size}")
        files = (folder / TOKENIZER_JSON, *(folder / name for name in COMPANIONS if (folder / name).is_file()))
        return cls("hf", files, tuple(eos), special_tokens, template)

    def write(self, artifact: Path) -> TokenizerInfo:
        """Copy the files into the artifact being written; the manifest's section for them."""
        refs = []
        if self.files:
            (artifact / ARTIFACT_FOLDER).mkdir()
        for path in self.files:
            copy = artifact / ARTIFACT_FOLDER / path.name
            shutil.copyfile(path, copy)
            refs.append(file_ref(artifact, copy))
        return TokenizerInfo(kind=self.kind, files=refs, eos_token_ids=list(self.eos_token_ids),
                             special_tokens=dict(self.special_tokens), chat_template=self.chat_template)


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerSourceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerSourceError(f"{path}: expected a JSON object")
    return data


def _token_text(value) -> str | None:
    """A special token as tokenizer configs write it: text, or {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja (how transformers saves it now), else tokenizer_config.json's entry: one
    template, or named ones of which "default" is the chat template."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise TokenizerSourceError(f"{folder / 'tokenizer_config.json'}: chat_template is not text")
    return template


def _eos_ids(folder: Path, model_config: dict, tokenizer, eos_text: str | None) -> list[int]:
    """What transformers' generate stops at: generation_config.json's eos_token_id, else the model
    config's, else the tokenizer's eos_token."""
    for source in (_json(folder / "generation_config.json"), model_config):
        value = source.get("eos_token_id")
        if value is not None:
            ids = value if isinstance(value, list) else [value]
            if not all(type(i) is int for i in ids):
                raise TokenizerSourceError(f"{folder}: eos_token_id {value!r} is not a token id or a list of them")
            return ids
    found = tokenizer.token_to_id(eos_text) if eos_text else None
    return [found] if found is not None else []
