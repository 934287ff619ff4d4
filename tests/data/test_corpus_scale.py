"""build_llm.data.corpus at scale: text read in bounded pieces whatever its line lengths (the ids
equal those of the whole text), peak memory of preparation, interrupted preparation leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import build_llm.data.corpus as corpus_mod
from build_llm.data.corpus import read_pieces
from build_llm.data.tokenizer import BPETokenizer, GPT2Tokenizer

WORDS = ["the", "quick", "brown", "fox", "don't", "jumps", "1984", "über", "naïve", "!!", "--", "日本語", "x"]
SPACES = [" ", " ", " ", "  ", "\t", "\n", "\n\n", " \n ", "   "]


def one_line_text(n_words: int, seed: int = 0, newlines: bool = False) -> str:
    """Words and every kind of whitespace run between them (no newline unless asked): one long line."""
    rng = np.random.default_rng(seed)
    spaces = SPACES if newlines else [s for s in SPACES if "\n" not in s]
    words, gaps = rng.choice(WORDS, n_words), rng.choice(spaces, n_words)
    return "".join(w + g for w, g in zip(words, gaps))


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(corpus_mod, "CHUNK_CHARS", 4096)
    monkeypatch.setattr(corpus_mod, "SAFE_CUT_SEARCH", 300)


@pytest.mark.parametrize("newlines", [False, True])
def test_a_long_line_is_read_in_pieces_that_encode_as_the_whole(tmp_path, small_pieces, newlines):
    text = one_line_text(40_000, newlines=newlines)
    path = tmp_path / "line.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(read_pieces([path]))
    assert "".join(pieces) == text and len(pieces) > 20
    assert max(map(len, pieces)) <= 4096 + 300
    gpt2 = GPT2Tokenizer()
    assert [i for p in pieces for i in gpt2.encode(p)] == gpt2.encode(text)
    bpe = BPETokenizer.train_from_texts([text[:50_000]], 400)
    assert [i for p in pieces for i in bpe.encode(p)] == bpe.encode(text)


def test_a_line_without_spaces_is_cut_at_characters(tmp_path, small_pieces):
    text = "é" * 20_000 + " tail"
    path = tmp_path / "dense.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(read_pieces([path]))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 4096 + 300


PEAK_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from build_llm.data.corpus import prepare_corpus
    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    from build_llm.data.tokenizer import GPT2Tokenizer
    GPT2Tokenizer().encode("warm up the encoder " * 1000)
    before = hwm()
    corpus, tok = prepare_corpus(sys.argv[1], "gpt2", Path(sys.argv[2]), 0.1)
    print(before, hwm(), corpus.meta["n_tokens"])
""")


@pytest.mark.slow
def test_preparing_a_32_mb_line_peaks_like_a_small_file(tmp_path):
    """A 32 MB file of one line tokenizes (GPT-2) in pieces: the peak grows by less than 160 MB, the
    working set of one piece (measured +119 MB; reading the line whole and encoding it in one call
    added 520 MB)."""
    path = tmp_path / "line.txt"
    text = one_line_text(6_000_000, seed=1)
    path.write_text(text, encoding="utf-8")
    size = path.stat().st_size
    assert size > 32e6
    proc = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(path), str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, peak, n_tokens = map(int, proc.stdout.split())
    print(f"{size / 1e6:.0f} MB on one line: {n_tokens:,} tokens, peak +{(peak - before) / 2**20:.0f} MB")
    assert n_tokens > 5_000_000 and peak - before < 160 * 2**20


INTERRUPT_CHILD = textwrap.dedent("""
    import signal, sys
    # Ctrl-C's handler, also when this test runs in a background job (whose children start with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from build_llm.cli import main
    sys.exit(main(["train", "--data", sys.argv[1], "--tokenizer", "gpt2", "--out", sys.argv[2], "--steps", "1"]))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_preparation_leaves_no_temporary_file(tmp_path, sig):
    """SIGTERM or SIGINT while the tokens are written (into the token cache): exit 130, and no
    temporary file left in the cache or the run."""
    path = tmp_path / "big.txt"
    path.write_text(one_line_text(3_000_000, newlines=True), encoding="utf-8")
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPT_CHILD, str(path), str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BUILD_LLM_CACHE": str(cache)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not [p for p in _temporary(tmp_path) if "tokens" in p.name]:
        time.sleep(0.02)
    assert _temporary(tmp_path), "the tokens were never being written"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    assert not _temporary(tmp_path)


def _temporary(folder):
    return [p for p in folder.rglob(".*") if ".tmp" in p.name or p.name.startswith(".tokens")]


def test_the_token_cache_serves_a_new_run_directory_and_sees_a_changed_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BUILD_LLM_CACHE", str(cache))
    path = tmp_path / "t.txt"
    path.write_text("the first corpus, " * 500, encoding="utf-8")
    first, _ = corpus_mod.prepare_corpus(path, "gpt2", tmp_path / "a" / "data", 0.1)
    assert cache.stat().st_mode & 0o777 == 0o700
    reads = []
    monkeypatch.setattr(corpus_mod, "read_pieces", lambda *a, **k: reads.append(a) or iter(()))
    second, _ = corpus_mod.prepare_corpus(path, "gpt2", tmp_path / "b" / "data", 0.1)
    assert not reads  # neither hashed nor tokenized again
    assert (tmp_path / "b" / "data" / "tokens.bin").stat().st_ino == (tmp_path / "a" / "data" / "tokens.bin").stat().st_ino
    assert np.array_equal(first.ids, second.ids) and second.meta == first.meta
    monkeypatch.undo()
    monkeypatch.setenv("BUILD_LLM_CACHE", str(cache))
    stat = path.stat()
    path.write_text("the other corpus, " * 500, encoding="utf-8")  # same size, same modification time
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    third, tok = corpus_mod.prepare_corpus(path, "gpt2", tmp_path / "c" / "data", 0.1)
    assert third.meta["data_sha256"] != first.meta["data_sha256"]
    assert tok.decode(np.asarray(third.ids[:4]).tolist()) == "the other corpus,"


def test_a_cache_others_can_write_is_not_used(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "shared"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    monkeypatch.setenv("BUILD_LLM_CACHE", str(cache))
    path = tmp_path / "t.txt"
    path.write_text("some text to tokenize " * 200, encoding="utf-8")
    corpus_mod.prepare_corpus(path, "gpt2", tmp_path / "run" / "data", 0.1)
    assert "not using the token cache" in capsys.readouterr().err
    assert not list(cache.iterdir())


def test_tokenizer_train_reads_a_long_line_in_pieces_and_learns_the_same_merges(tmp_path, small_pieces, capsys,
                                                                                monkeypatch):
    """`tokenizer train` on one long line: the trainer sees small pieces (64k characters; 500 here),
    cut where no word is split, so it counts the same words and learns the same BPE as on the whole."""
    import build_llm.cli.model as model_cli
    from build_llm.cli import main

    text = one_line_text(30_000, seed=2)
    path = tmp_path / "line.txt"
    path.write_text(text, encoding="utf-8")
    seen = []
    monkeypatch.setattr(model_cli, "small_pieces", lambda p: (seen.append(x) or x for x in corpus_mod.small_pieces(p, 500)))
    assert main(["tokenizer", "train", "--data", str(path), "--vocab-size", "300", "--out", str(tmp_path / "t.json")]) == 0
    err = capsys.readouterr().err
    assert "distinct words" in err and "the trainer needs about" in err
    assert "".join(seen) == text and max(map(len, seen)) <= 500 and len(seen) > 100
    whole = BPETokenizer.train_from_texts([text], 300)
    assert whole.to_json()["model"] == json.loads((tmp_path / "t.json").read_text())["model"]


def test_tokenizer_train_refuses_invalid_utf8_late_in_a_file(tmp_path, small_pieces, capsys):
    from build_llm.cli import main

    path = tmp_path / "late.txt"
    path.write_bytes(one_line_text(5000).encode("utf-8") + "ação".encode("latin-1"))
    out = tmp_path / "t.json"
    code = main(["tokenizer", "train", "--data", str(path), "--vocab-size", "300", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "is not valid UTF-8" in err.splitlines()[-1] and "Traceback" not in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_default_bpe_is_trained_once_for_every_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILD_LLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.txt"
    path.write_text(one_line_text(20_000, seed=3, newlines=True), encoding="utf-8")
    first, tok = corpus_mod.prepare_corpus(path, "bpe", tmp_path / "a" / "data", 0.1)
    monkeypatch.setattr(BPETokenizer, "train_from_texts", lambda *a, **k: pytest.fail("trained again"))
    second, tok2 = corpus_mod.prepare_corpus(path, "bpe", tmp_path / "b" / "data", 0.1)
    assert tok2.to_json() == tok.to_json() and np.array_equal(first.ids, second.ids)
    assert sorted(p.name for p in (tmp_path / "b" / "data").iterdir()) == sorted(
        p.name for p in (tmp_path / "a" / "data").iterdir())
