"""A Hugging Face tokenizer's side files: which tokens are bos/eos/pad/unk, the chat template and the
ids generation stops on, read as `transformers` reads them and written back so `AutoTokenizer` loads them.

A Hugging Face model directory keeps them beside tokenizer.json (which itself only says which added
tokens are special, not which one ends a text):

    tokenizer_config.json       bos_token, eos_token, pad_token, unk_token (a string, or an AddedToken
                                object with "content"), chat_template (a string, or a list of
                                {name, template})
    special_tokens_map.json     the same tokens, in files older than tokenizer_config.json's
                                added_tokens_decoder (transformers then lets this file win)
    chat_template.jinja         the template; with chat_templates/NAME.jinja, named ones. These files,
                                when present, replace tokenizer_config.json's templates
    generation_config.json      eos_token_id: an id or a list of ids that end a reply (without it,
                                config.json's, as transformers' generate falls back to)

A checkpoint keeps the same files under the same names, so either kind of directory reads the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from build_llm.errors import UsageError
from build_llm.store.fsio import read_json, write_text

SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"
TEMPLATE_FILE, TEMPLATE_DIR = "chat_template.jinja", "chat_templates"
GENERATION_CONFIG, MODEL_CONFIG = "generation_config.json", "config.json"


@dataclass(frozen=True)
class TokenizerConfig:
    """What a Hugging Face tokenizer's side files say; None where they are silent."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | dict[str, str] | None = None  # Jinja source, or named sources
    eos_token_ids: tuple[int, ...] = ()  # generation_config.json's ids that end a reply

    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, as a chat template sees them (bos_token, ...)."""
        return {name: getattr(self, name) for name in SPECIAL_NAMES if getattr(self, name) is not None}

    def template_source(self) -> str | None:
        """The Jinja source transformers uses by default: the only one, or the one named "default"."""
        if not isinstance(self.chat_template, dict):
            return self.chat_template
        if "default" not in self.chat_template:
            raise UsageError(f"the tokenizer has chat templates named {sorted(self.chat_template)} but none named "
                             "'default', which is the one a chat uses; rename one of them 'default'")
        return self.chat_template["default"]


def _token_text(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # a serialised AddedToken
        return value["content"]
    raise UsageError(f"{where} is {str(value)[:60]}; expected a token's text or an object with 'content'")


def _templates(raw: Any, where: str) -> str | dict[str, str] | None:
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                     and isinstance(t.get("template"), str) for t in raw):
        return {t["name"]: t["template"] for t in raw}
    raise UsageError(f"{where}: chat_template must be a string or a list of {{name, template}} objects, "
                     f"got {str(raw)[:60]}")


def _template_files(directory: Path) -> str | dict[str, str] | None:
    named = {}
    if (directory / TEMPLATE_FILE).is_file():
        named["default"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / TEMPLATE_DIR).is_dir():
        for path in sorted((directory / TEMPLATE_DIR).glob("*.jinja")):
            named[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if list(named) == ["default"]:
        return named["default"]
    return named or None


def _stop_ids(directory: Path) -> tuple[int, ...]:
    path = directory / GENERATION_CONFIG
    if not path.is_file():
        path = directory / MODEL_CONFIG
        if not path.is_file():
            return ()
    config = read_json(path)
    ids = config.get("eos_token_id") if isinstance(config, dict) else None
    ids = [ids] if isinstance(ids, int) else ids
    if ids is None:
        return ()
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise UsageError(f"{str(path)!r}: eos_token_id={ids!r} is invalid; expected a token id or a list of them")
    return tuple(dict.fromkeys(ids))


def read_tokenizer_config(directory: str | Path) -> TokenizerConfig:
    """The special tokens, chat template and stop ids that the side files in `directory` give."""
    directory = Path(directory)
    config_path = directory / TOKENIZER_CONFIG
    config = read_json(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise UsageError(f"{str(config_path)!r} must hold a JSON object, got {type(config).__name__}")
    specials = {name: config.get(name) for name in SPECIAL_NAMES}
    map_path = directory / SPECIAL_TOKENS_MAP
    if "added_tokens_decoder" not in config and map_path.is_file():  # transformers' rule for older files
        extra = read_json(map_path)
        if isinstance(extra, dict):
            specials.update({name: extra[name] for name in SPECIAL_NAMES if name in extra})
    texts = {name: _token_text(value, f"{directory.name}/{TOKENIZER_CONFIG}: {name}") for name, value in specials.items()}
    template = _template_files(directory) or _templates(config.get("chat_template"), str(config_path))
    return TokenizerConfig(**texts, chat_template=template, eos_token_ids=_stop_ids(directory))


def write_tokenizer_config(directory: str | Path, config: TokenizerConfig, **extra: Any) -> list[str]:
    """Write `config` as transformers' own files into `directory` (tokenizer_config.json, chat_template.jinja
    or the named list, generation_config.json for the stop ids); returns the names written. `extra`
    adds keys to tokenizer_config.json (model_max_length)."""
    directory = Path(directory)
    body: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **config.special_tokens_map(), **extra}
    written = [TOKENIZER_CONFIG]
    if isinstance(config.chat_template, str):
        write_text(directory / TEMPLATE_FILE, config.chat_template)
        written.append(TEMPLATE_FILE)
    elif config.chat_template:
        body["chat_template"] = [{"name": k, "template": v} for k, v in config.chat_template.items()]
    write_text(directory / TOKENIZER_CONFIG, json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    if config.eos_token_ids:
        write_text(directory / GENERATION_CONFIG, json.dumps({"eos_token_id": list(config.eos_token_ids)}) + "\n")
        written.append(GENERATION_CONFIG)
    return written

