"""Data: text -> token ids on disk -> train/validation splits -> batches.

Two ways to cut batches from a stream of token ids:
- random windows (the R notebook): each row starts at a uniformly drawn position. The draw for a
  step comes from a generator seeded by (seed, step), so a resumed run or a process of a
  distributed run draws exactly the batch an uninterrupted single process would.
- sliding windows with a stride (as the book's `GPTDatasetV1` cuts them; the book's dataset and
  loader are in `build_llm.book.ch02`).

`prepare_corpus` tokenizes a UTF-8 file or folder of files into `tokens.bin`, a NumPy memmap
(uint16 when the vocabulary fits, else uint32), so a corpus of gigabytes is never held in memory
while training. The held-out text is the last `val_ratio` of every file (in characters), so that
validation represents each file of a folder, not its last files only: the ids of every file's
training part come first, then those of every file's held-out part.

The default tokenizer of a text corpus ("bpe") is a byte-level BPE trained on the training part,
its size set by the corpus's length (`bpe_vocab_size`): it encodes any text and has an end token.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from build_llm.data.markov import abc_text
from build_llm.data.tokenizer import BPETokenizer, CharTokenizer, get_tokenizer, load_tokenizer
from build_llm.errors import UsageError
from build_llm.progress import Progress
from build_llm.data.cache import cached_scan, tokens_dir
from build_llm.store.fsio import atomic_write, link_or_copy, read_json, write_json

TOKENS_FILE, META_FILE = "tokens.bin", "meta.json"
# Text is read in pieces of about CHUNK_CHARS characters (at most CHUNK_CHARS + SAFE_CUT_SEARCH), so
# that neither a big corpus nor a long line is ever wholly in memory. A piece ends where a tokenizer
# would cut anyway: before a whitespace character that stands between two others (" word", "\nword").
# GPT-2's split pattern (tiktoken's and our byte-level BPE's pre-tokenizer) always ends a pre-token
# there and looks only ahead, so the pieces encode to exactly the ids of the whole text; a character
# tokenizer cuts anywhere. Only where the last SAFE_CUT_SEARCH characters hold no such place (a
# run of that many characters without a single space) is a piece cut at a character boundary: a BPE
# may then start a new token where the whole text would have merged one, once per such cut.
CHUNK_CHARS = 1 << 22
SAFE_CUT_SEARCH = 1 << 16
_SAFE_CUT = re.compile(r"(?<=\S)\s(?=\S)")


# --- reading text --------------------------------------------------------------------------------
def text_files(path: str | os.PathLike[str]) -> list[Path]:
    """The text files of `path`: the file itself, or every non-hidden file under a folder, sorted."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"data path {str(path)!r} does not exist; give a UTF-8 text file or a folder of them")
    if p.is_file():
        files = [p]
    elif not p.is_dir():
        raise UsageError(f"data path {str(path)!r} is not a regular file or a folder (a device or a pipe?); "
                         "give a UTF-8 text file or a folder of them")
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise UsageError(f"data folder {str(path)!r} has no files; expected UTF-8 text files in it")
    return files


def safe_cut(text: str) -> int:
    """Where to end a piece of `text` (see CHUNK_CHARS): the last place before a whitespace character
    between two others, within the last SAFE_CUT_SEARCH characters; else the end of `text`."""
    start = max(0, len(text) - SAFE_CUT_SEARCH)
    cut = None
    for cut in _SAFE_CUT.finditer(text, start):
        pass
    return cut.start() if cut is not None and cut.start() > 0 else len(text)


def read_pieces(files: list[Path], progress: Progress | None = None) -> Iterator[str]:
    """The files' text in pieces of about CHUNK_CHARS characters, whatever the lengths of its lines,
    each ending at a safe place for a tokenizer (safe_cut); checks UTF-8 and text-ness. `progress`
    is told the bytes read."""
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8192)
        if b"\x00" in head:
            raise UsageError(f"data file {str(f)!r} looks binary (it has NUL bytes); give UTF-8 text")
        try:
            with open(f, encoding="utf-8", newline="") as fh:
                carry, pos = "", 0
                while block := fh.read(CHUNK_CHARS):
                    if progress is not None:
                        progress.update(fh.buffer.tell() - pos)
                        pos = fh.buffer.tell()
                    if "\x00" in block:  # NUL is not text; the head check above misses a late one
                        raise UsageError(f"data file {str(f)!r} looks binary (it has NUL bytes); give UTF-8 text")
                    text = carry + block
                    cut = safe_cut(text)
                    carry = text[cut:]
                    if cut:
                        yield text[:cut]
                if carry:
                    yield carry
        except UnicodeDecodeError as e:
            raise UsageError(f"data file {str(f)!r} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                             "convert it to UTF-8") from None


def read_showing_progress(files: list[Path], desc: str) -> Iterator[str]:
    """read_pieces with its progress shown on stderr as `desc` (progress.Progress)."""
    with Progress(desc, sum(f.stat().st_size for f in files), "B") as progress:
        yield from read_pieces(files, progress)


def small_pieces(pieces: Iterator[str], chars: int = 1 << 16) -> Iterator[str]:
    """The pieces cut again at safe places (safe_cut) into pieces of at most `chars` characters: for a
    consumer that holds hundreds of pieces at once (the tokenizers trainer buffers 256)."""
    for piece in pieces:
        start = 0
        while len(piece) - start > chars:
            window = piece[start:start + chars]
            cut = safe_cut(window)
            yield window[:cut]
            start += cut
        if start < len(piece):
            yield piece[start:]


def read_text(path: str | os.PathLike[str]) -> str:
    """All the text of a UTF-8 file or folder of files (folder files joined in sorted path order)."""
    text = "".join(read_pieces(text_files(path)))
    if not text.strip():
        raise UsageError(f"data {str(path)!r} is empty; give a non-empty UTF-8 text")
    return text


def fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the data's bytes (the files in order): identifies the corpus a run trained on."""
    h = hashlib.sha256()
    for f in text_files(path):
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


# --- token files ---------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass
class Corpus:
    """Token ids of a corpus (a memmap), cut into train and validation splits."""
    ids: np.ndarray
    n_train: int
    meta: dict[str, Any]

    @property
    def train(self) -> np.ndarray:
        return self.ids[: self.n_train]

    @property
    def val(self) -> np.ndarray:
        return self.ids[self.n_train:]


def write_tokens(pieces: Callable[[bool], Iterator[str]], tokenizer: Any, out_dir: Path, meta: dict[str, Any],
                 val_ratio: float) -> Corpus:
    """Tokenize the training pieces (`pieces(False)`), then the held-out ones (`pieces(True)`), into
    out_dir/tokens.bin and write meta.json; both appear atomically. The tokenizer is given at most
    64K characters at once (small_pieces): a BPE's working memory grows with the text it is given
    (Shakespeare's 4 MB pieces: 700 MB more at the peak)."""
    dtype = token_dtype(tokenizer.vocab_size)
    n, n_train = 0, 0
    with atomic_write(out_dir / TOKENS_FILE, "wb") as fh:
        for held_out in (False, True):
            n_train = n if held_out else 0
            for piece in small_pieces(pieces(held_out)):
                ids = np.asarray(tokenizer.encode(piece), dtype=dtype)
                ids.tofile(fh)
                n += ids.size
    meta = {**meta, "n_tokens": n, "n_train": n_train, "dtype": dtype.name, "val_ratio": val_ratio}
    write_json(out_dir / META_FILE, meta)
    return open_corpus(out_dir)


def open_corpus(data_dir: Path) -> Corpus:
    """The corpus a previous `write_tokens` left in `data_dir` (memory-mapped, read-only)."""
    meta = read_json(data_dir / META_FILE)
    n = meta["n_tokens"]
    ids = np.memmap(data_dir / TOKENS_FILE, dtype=np.dtype(meta["dtype"]), mode="r", shape=(n,)) if n else \
        np.zeros(0, dtype=meta["dtype"])
    return Corpus(ids, meta["n_train"], meta)


def _matching(data_dir: Path, meta: dict[str, Any], val_ratio: float) -> Corpus | None:
    """data_dir's corpus if it came from the same source, tokenizer and split and is whole, else None."""
    if (data_dir / META_FILE).is_file() and (data_dir / TOKENS_FILE).is_file():
        try:
            corpus = open_corpus(data_dir)
            same = all(corpus.meta.get(k) == v for k, v in meta.items()) and corpus.meta["val_ratio"] == val_ratio
            if same and (data_dir / TOKENS_FILE).stat().st_size == corpus.ids.nbytes:
                return corpus
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            pass  # unreadable or tampered leftovers: tokenize again
    return None


def load_or_write_tokens(data_dir: Path, meta: dict[str, Any], pieces, tokenizer: Any,
                         val_ratio: float) -> Corpus:
    """Reuse data_dir's tokens when they came from the same source, tokenizer and split; else the
    token cache's (data.cache), linked into data_dir; else tokenize, into the cache when there is one."""
    if (corpus := _matching(data_dir, meta, val_ratio)) is not None:
        return corpus
    cached = tokens_dir({**meta, "val_ratio": val_ratio, "format": 1}) if meta.get("source") == "text" else None
    if cached is None:
        return write_tokens(pieces, tokenizer, data_dir, meta, val_ratio)
    if _matching(cached, meta, val_ratio) is None:
        cached.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_tokens(pieces, tokenizer, cached, meta, val_ratio)
    for name in (TOKENS_FILE, META_FILE):  # the run keeps its tokens if the cache is removed
        link_or_copy(cached / name, data_dir / name)
    return open_corpus(data_dir)


def check_splits(corpus: Corpus, context_length: int) -> None:
    """Both splits must hold at least one window of context_length inputs plus the next target."""
    need = context_length + 1
    if corpus.n_train < need or len(corpus.val) < need:
        raise UsageError(
            f"corpus too short: {corpus.meta['n_tokens']} tokens give {corpus.n_train} for training and "
            f"{len(corpus.val)} for validation, but each needs at least context_length + 1 = {need}; "
            "give more text, a shorter --context-length or another --val-ratio")


# --- random-window batches -----------------------------------------------------------------------
def step_rng(seed: int, *key: int) -> np.random.Generator:
    """A generator determined by (seed, *key): the same draw on every process and after a resume."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def random_windows(ids: np.ndarray, starts: np.ndarray, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (len(starts), context_length) at `starts`: targets are inputs shifted by one."""
    rows = ids[np.asarray(starts)[:, None] + np.arange(context_length + 1)[None, :]]  # (B, T+1)
    z = torch.from_numpy(rows.astype(np.int64))
    return z[:, :-1], z[:, 1:]


def draw_starts(n_ids: int, context_length: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """`batch_size` window starts drawn uniformly (with replacement) from every valid position."""
    return rng.integers(0, n_ids - context_length, size=batch_size)


def sliding_starts(n_ids: int, context_length: int, stride: int | None = None) -> np.ndarray:
    """Starts of the sliding windows that fit, every `stride` ids (default: non-overlapping)."""
    return np.arange(0, n_ids - context_length, stride or context_length)


# --- a run's corpus ------------------------------------------------------------------------------
def _scan(files: list[Path]) -> tuple[str, str, list[int]]:
    """One pass over the files: SHA-256 of their bytes, their characters (sorted), each one's length;
    remembered in the cache (data.cache.cached_scan), so an unchanged corpus is not read again."""
    def scan() -> tuple[str, str, list[int]]:
        h, chars, lengths = hashlib.sha256(), set(), []
        with Progress("read", sum(f.stat().st_size for f in files), "B") as progress:
            for f in files:
                lengths.append(0)
                for piece in read_pieces([f], progress):
                    h.update(piece.encode("utf-8"))
                    chars.update(piece)
                    lengths[-1] += len(piece)
        return h.hexdigest(), "".join(sorted(chars)), lengths

    sha, chars, lengths = cached_scan(files, scan)
    return (sha, chars, lengths) if isinstance(lengths, list) else scan()  # a record without each file's length


def split_pieces(files: list[Path], cuts: list[int], held_out: bool, desc: str | None = None) -> Iterator[str]:
    """The training part (each file's characters before its cut) or the held-out part (from it on)
    of the files' text, in pieces; with `desc`, the reading shown on stderr (progress.Progress)."""
    with Progress(desc or "", sum(f.stat().st_size for f in files), "B", enabled=desc is not None) as progress:
        for f, cut in zip(files, cuts):
            pos = 0
            for piece in read_pieces([f], progress):
                part = piece[max(0, cut - pos):] if held_out else piece[:max(0, cut - pos)]
                pos += len(piece)
                if part:
                    yield part


def held_out_cut(n_chars: int, val_ratio: float) -> int:
    """Where a text of `n_chars` characters is cut: its last `val_ratio` is held out."""
    return round((1 - val_ratio) * n_chars)


# A trained BPE gets about sqrt(characters of training text) ids, a power of two within these bounds
# (Shakespeare's 4.4M training characters: 2,048): more text affords a larger vocabulary. Not yet
# calibrated: the comparison of sizes under the default 5-minute budget was drowned by a busy machine.
BPE_VOCAB_RANGE = (512, 32768)


def bpe_vocab_size(n_chars: int) -> int:
    """The default BPE's size for a training text of `n_chars` characters."""
    lo, hi = BPE_VOCAB_RANGE
    return int(min(hi, max(lo, 2 ** round(np.log2(max(n_chars, 1)) / 2))))


def train_bpe(texts: Callable[[], Iterator[str]], n_chars: int, data_dir: Path, data_sha256: str) -> BPETokenizer:
    """The default tokenizer: a byte-level BPE (every byte encodable, an end token) trained on the
    training text; kept in data_dir under a name from the text and size, and reused, so every
    process and a resumed run encode with the same one."""
    vocab = bpe_vocab_size(n_chars)
    name, data_dir = f"bpe-{vocab}-{data_sha256[:16]}.json", Path(data_dir)
    cached = tokens_dir({"bpe_vocab": vocab, "data_sha256": data_sha256})  # kept for the runs of other --out
    for path in [data_dir / name, *([cached / name] if cached is not None else [])]:
        if path.is_file():
            try:
                tok = load_tokenizer(path)
            except (OSError, ValueError):
                continue  # unreadable: train it again
            if path.parent != data_dir:
                link_or_copy(path, data_dir / name)
            return tok
    tok = BPETokenizer.train_from_texts(small_pieces(texts()), vocab)
    (cached or data_dir).mkdir(mode=0o700 if cached is not None else 0o777, parents=True, exist_ok=True)
    write_json((cached or data_dir) / name, tok.to_json())
    if cached is not None:
        link_or_copy(cached / name, data_dir / name)
    return tok


def check_tokenizer_choice(tokenizer: str | os.PathLike[str], data: str | os.PathLike[str] | None) -> None:
    """Refuse a --tokenizer that prepare_corpus cannot use, in the flag's words and before anything is written."""
    if str(tokenizer) == "bpe" and data is None:
        raise UsageError("--tokenizer bpe is trained on --data; the ABC experiment takes char, gpt2 or a tokenizer JSON")
    if str(tokenizer) not in ("bpe", "char", "gpt2") and not Path(tokenizer).exists():
        raise UsageError(f"--tokenizer {str(tokenizer)!r} is neither bpe, char, gpt2 nor an existing tokenizer JSON "
                         "file or checkpoint directory; give one of those")


def prepare_corpus(data: str | os.PathLike[str] | None, tokenizer: str | os.PathLike[str], data_dir: Path,
                   val_ratio: float, abc_words: int = 150_000, abc_seed: int = 1,
                   same_as: dict[str, Any] | None = None) -> tuple[Corpus, Any]:
    """(corpus, tokenizer) for a run: `data` a text file or folder, or None for the ABC source.

    `tokenizer` is "bpe" (a byte-level BPE trained on the training part, sized to it), "char" (the
    corpus's characters, as the R notebook), "gpt2" or a tokenizer JSON path. Token ids go to
    data_dir/tokens.bin; a later call with the same source, tokenizer and split reuses them. With
    `same_as` (a resumed run's data identity), data or a tokenizer that differ from it are refused
    before anything is written.
    """
    if data is None:
        text = abc_text(abc_words, abc_seed)
        tok = CharTokenizer.from_text(text) if tokenizer == "char" else get_tokenizer(tokenizer)
        sha, cut = hashlib.sha256(text.encode("utf-8")).hexdigest(), held_out_cut(len(text), val_ratio)
        pieces = lambda held_out: iter([text[cut:] if held_out else text[:cut]])  # noqa: E731
        source = {"source": "abc", "abc_words": abc_words, "abc_seed": abc_seed, "n_train_chars": cut}
    else:
        files = text_files(data)
        sha, chars, lengths = _scan(files)
        if sum(lengths) == 0 or not "".join(sorted(chars)).strip():
            raise UsageError(f"data {str(data)!r} is empty; give a non-empty UTF-8 text")
        cuts = [held_out_cut(n, val_ratio) for n in lengths]
        pieces = lambda held_out: split_pieces(files, cuts, held_out, "tokenize")  # noqa: E731
        if tokenizer == "char":
            tok = CharTokenizer(["<PAD>", *sorted(chars)])
        elif tokenizer == "bpe":
            train_part = lambda: split_pieces(files, cuts, False, "train the tokenizer")  # noqa: E731
            tok = train_bpe(train_part, sum(cuts), data_dir, sha)
        else:
            tok = get_tokenizer(tokenizer)
        source = {"source": "text", "split": "the last part of each file", "n_train_chars": sum(cuts)}
    tok_json = json.dumps(tok.to_json(), sort_keys=True)
    meta = {**source, "data_sha256": sha, "tokenizer_sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
            "vocab_size": tok.vocab_size}
    for key, what in (("data_sha256", "data"), ("tokenizer_sha256", "tokenizer")):
        if same_as is not None and meta[key] != same_as.get(key):
            raise UsageError(f"--resume: the {what} differs from the one the checkpoint was trained on; give the "
                             "same --data and --tokenizer, or start a new run with another --out")
    corpus = load_or_write_tokens(Path(data_dir), meta, pieces, tok, val_ratio)
    if corpus.meta["n_tokens"] == 0:
        raise UsageError(f"data {str(data)!r} gives no tokens; give a non-empty UTF-8 text")
    return corpus, tok
