"""Tests for build_llm.data.corpus: reading text, token files, splits, random and sliding windows."""

from __future__ import annotations

import numpy as np
import pytest
import tiktoken
import torch

from build_llm.data.corpus import (bpe_vocab_size, draw_starts, prepare_corpus, random_windows, read_text, step_rng,
                                   token_dtype)
from build_llm.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

TEXT = ("In the beginning the text was short, and the model was small.\n"
        "Every effort moves you, said the book, and so the windows slid along.\n") * 3


def test_read_text_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second é\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / ".hidden").write_text("never", encoding="utf-8")
    assert read_text(tmp_path) == "first\nsecond é\n"  # sorted by path, hidden files skipped
    assert read_text(tmp_path / "b.txt") == "second é\n"


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "empty"),
    (b"  \n\n", "empty"),
    (b"abc\x00\x01\x02", "binary"),
    ("caf\u00e9".encode("latin-1"), "not valid UTF-8"),
])
def test_read_text_bad_data(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_text(path)
    with pytest.raises(ValueError, match=message):
        prepare_corpus(path, "char", tmp_path / "run" / "data", 0.1)


def test_empty_folder(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no files"):
        read_text(tmp_path / "d")


def test_prepare_corpus_memmap_split_and_reuse(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    corpus, tok = prepare_corpus(path, "char", tmp_path / "data", 0.25)
    assert isinstance(tok, CharTokenizer) and tok.vocab == ["<PAD>", *sorted(set(TEXT))]
    assert isinstance(corpus.ids, np.memmap) and corpus.ids.dtype == np.uint16
    assert corpus.n_train == round(0.75 * len(TEXT))
    assert tok.decode(np.asarray(corpus.train).tolist()) == TEXT[:corpus.n_train]
    assert tok.decode(np.asarray(corpus.val).tolist()) == TEXT[corpus.n_train:]
    mtime = (tmp_path / "data" / "tokens.bin").stat().st_mtime_ns
    again, _ = prepare_corpus(path, "char", tmp_path / "data", 0.25)  # same source: reused, not rewritten
    assert (tmp_path / "data" / "tokens.bin").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.ids, corpus.ids)
    path.write_text(TEXT + "more", encoding="utf-8")  # changed data: tokenized again
    changed, _ = prepare_corpus(path, "char", tmp_path / "data", 0.25)
    assert changed.meta["n_tokens"] == len(TEXT) + 4


def test_prepare_corpus_gpt2_and_abc(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    corpus, tok = prepare_corpus(path, "gpt2", tmp_path / "g", 0.1)
    assert corpus.ids.dtype == np.uint16  # 50257 ids fit
    cut = round(0.9 * len(TEXT))  # the held-out text is the file's last tenth, in characters
    gpt2 = tiktoken.get_encoding("gpt2")
    assert np.asarray(corpus.ids).tolist() == gpt2.encode(TEXT[:cut]) + gpt2.encode(TEXT[cut:])
    assert corpus.n_train == len(gpt2.encode(TEXT[:cut]))
    abc, tok = prepare_corpus(None, "char", tmp_path / "abc", 0.2, abc_words=1000, abc_seed=1)
    assert tok.vocab == ["<PAD>", "\n", "A", "B", "C"]
    assert abc.meta["source"] == "abc" and abc.n_train == round(0.8 * abc.meta["n_tokens"])


def test_tokenizer_path_errors(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    with pytest.raises(ValueError, match="neither a tokenizer name"):
        prepare_corpus(path, str(tmp_path / "missing.json"), tmp_path / "d", 0.1)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="does not parse"):
        prepare_corpus(path, str(tmp_path / "bad.json"), tmp_path / "d", 0.1)


def test_token_dtype():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_random_windows_and_step_rng():
    ids = np.arange(100, dtype=np.uint16)
    x, y = random_windows(ids, np.array([0, 10, 83]), 16)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    torch.testing.assert_close(x[1], torch.arange(10, 26))
    torch.testing.assert_close(y[1], torch.arange(11, 27))
    torch.testing.assert_close(y[2], torch.arange(84, 100))  # the last window that fits
    a = draw_starts(100, 16, 1000, step_rng(7, 0, 5))
    b = draw_starts(100, 16, 1000, step_rng(7, 0, 5))
    c = draw_starts(100, 16, 1000, step_rng(7, 0, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() == 0 and a.max() == 100 - 16 - 1  # every valid start, and only those


def test_a_folder_holds_out_the_last_part_of_each_file(tmp_path):
    """Validation represents every file of a folder: not its last files, the last part of each."""
    folder = tmp_path / "d"
    folder.mkdir()
    texts = {"a.txt": "αβγδ εζηθ " * 40, "b.txt": "один два три " * 30, "c.txt": "ünï çødé " * 50}
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    corpus, tok = prepare_corpus(folder, "char", tmp_path / "data", 0.2)
    cuts = {name: round(0.8 * len(t)) for name, t in texts.items()}
    train = "".join(t[:cuts[n]] for n, t in sorted(texts.items()))
    held_out = "".join(t[cuts[n]:] for n, t in sorted(texts.items()))
    assert tok.decode(np.asarray(corpus.train).tolist()) == train
    assert tok.decode(np.asarray(corpus.val).tolist()) == held_out
    assert corpus.meta["split"] == "the last part of each file"


def test_the_default_bpe_is_trained_on_the_training_part(tmp_path):
    """"bpe": a byte-level BPE with an end token, trained on the training part only, kept and reused."""
    train_words, held_out_words = "Ωμέγα λόγος ψυχή ", "Zebra quokka "
    text = train_words * 400 + held_out_words * 100  # the held-out fifth is only the last words
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    corpus, tok = prepare_corpus(path, "bpe", tmp_path / "data", 0.2)
    assert isinstance(tok, BPETokenizer) and tok.eos_id is not None
    assert tok.vocab_size <= bpe_vocab_size(round(0.8 * len(text)))
    assert tok.decode(np.asarray(corpus.ids).tolist()) == text  # every byte encodable, exactly
    vocab = tok.hf_tokenizer.get_vocab()
    assert any("Î©" in piece and len(piece) > 2 for piece in vocab)  # merges from the training part ("Ω" in bytes)
    assert not any("Zebra" in piece or "quokka" in piece for piece in vocab)  # none from the held-out part
    again, tok2 = prepare_corpus(path, "bpe", tmp_path / "data", 0.2)  # the same tokenizer, from the file
    assert tok2.to_json() == tok.to_json() and np.array_equal(again.ids, corpus.ids)
    (saved,) = (tmp_path / "data").glob("bpe-*.json")
    assert load_tokenizer(saved).encode(text) == tok.encode(text)


def test_bpe_vocab_size_grows_with_the_text():
    sizes = [bpe_vocab_size(n) for n in (10**3, 10**6, 10**8, 10**12)]
    assert sizes == sorted(sizes) and sizes[0] == 512 and sizes[1] == 1024 and sizes[-1] == 32768
