"""`build-llm eval` (infer/evaluate.py) streams its text: pieces tokenized one by one, window by window, with
the numbers of the whole text tokenized at once and scored over its non-overlapping windows (computed
here independently), and a peak memory that does not grow with the text (a child process on 40 MB)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from build_llm import CharTokenizer, GPTConfig, GPTModel, get_tokenizer, save_checkpoint
from build_llm.data import corpus
from build_llm.data.tokenizer import PAD
from build_llm.infer.evaluate import evaluate_checkpoint, text_windows

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief.\n") * 30
# Characters of several bytes, split across GPT-2's tokens: a window may end inside one
UNICODE = ("café naïve — 東京 and back; " * 4 + "\n") * 20
SMALL = dict(context_length=24, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def whole_text_numbers(model, tokenizer, text: str, batch_size: int) -> dict:
    """The text tokenized at once, its windows [s, s + T] for s = 0, T, ... while s + T < len(ids), scored in
    consecutive batches (float64 sums); characters and bytes of the decoded targets."""
    ids = tokenizer.encode(text)
    T = model.cfg.context_length
    windows = [ids[s:s + T + 1] for s in range(0, len(ids) - T, T)]
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            w = torch.tensor(windows[i:i + batch_size])
            logits = model(w[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").double().item()
            n += w[:, 1:].numel()
    scored = tokenizer.decode(ids[1:n + 1])
    return {"loss": total / n, "tokens": n, "windows": len(windows), "characters": len(scored),
            "bytes": len(scored.encode("utf-8")), "bits_per_char": total / n * n / math.log(2) / len(scored)}


@pytest.mark.parametrize("kind", ["gpt2", "char"])
@pytest.mark.parametrize("chunk", [corpus.CHUNK_CHARS, 300])
def test_streamed_eval_equals_the_whole_text_scored_at_once(tmp_path, monkeypatch, kind, chunk):
    tokenizer = get_tokenizer("gpt2") if kind == "gpt2" else CharTokenizer([PAD, *sorted(set(TEXT))])
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, **SMALL)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    monkeypatch.setattr(corpus, "CHUNK_CHARS", chunk)  # 300: the text read in about 20 pieces
    got = evaluate_checkpoint(tmp_path / "ckpt", str(tmp_path / "text.txt"), batch_size=5)
    want = whole_text_numbers(model, tokenizer, TEXT, batch_size=5)
    for key in ("loss", "tokens", "windows", "characters", "bytes"):
        assert got[key] == want[key], key
    assert got["bits_per_char"] == pytest.approx(want["bits_per_char"], rel=1e-12)
    assert want["windows"] > 5 and want["windows"] % 5  # several batches, the last one short


def test_characters_and_bytes_are_counted_per_token_where_a_window_ends_inside_a_character(tmp_path):
    """Today's count decoded the targets, where a character cut at the end became U+FFFD (3 bytes); the
    stream counts each target token's own bytes (and characters: the bytes that start one), as training's
    bits per character do (data.tokenizer.text_size)."""
    tokenizer = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, **SMALL)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    (tmp_path / "text.txt").write_text(UNICODE, encoding="utf-8")
    got = evaluate_checkpoint(tmp_path / "ckpt", str(tmp_path / "text.txt"), batch_size=5)
    want = whole_text_numbers(model, tokenizer, UNICODE, batch_size=5)
    assert got["loss"] == want["loss"] and got["tokens"] == want["tokens"]
    ids = tokenizer.encode(UNICODE)[1:got["tokens"] + 1]
    scored = b"".join(tokenizer.encoding.decode_single_token_bytes(i) for i in ids)
    assert got["bytes"] == len(scored)
    assert got["characters"] == sum((b & 0xC0) != 0x80 for b in scored)


def test_windows_are_sent_on_as_soon_as_their_ids_are_in():
    tokenizer, read = CharTokenizer([PAD, *"abcdefgh"]), []

    def pieces():
        for piece in ["abcde", "fgh", "abcdefgh", "a"]:  # 17 ids: windows at 0, 3, 6, 9 and 12
            read.append(piece)
            yield piece

    windows = text_windows(pieces(), tokenizer, context_length=3, batch_size=2)
    assert (next(windows) - 1).tolist() == [[0, 1, 2, 3], [3, 4, 5, 6]]  # ids: a is 1 (after PAD)
    assert read == ["abcde", "fgh"]  # nothing more was read for them
    assert [(w - 1).tolist() for w in windows] == [[[6, 7, 0, 1], [1, 2, 3, 4]], [[4, 5, 6, 7]]]


EVAL_CHILD = textwrap.dedent("""
    import json, sys
    from build_llm.infer.evaluate import evaluate_checkpoint

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    evaluate_checkpoint(sys.argv[1], sys.argv[3])  # the libraries' one-time costs, on a short text
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak from here on
    base = status("VmRSS")
    result = evaluate_checkpoint(sys.argv[1], sys.argv[2])
    print(json.dumps({"peak": status("VmHWM") - base, "tokens": result["tokens"]}))
""")


def eval_peak(tmp_path, megabytes: int) -> dict:
    words = "the cat sat on a mat and the dog ran to the red fox while it was late at night".split()
    rng = np.random.default_rng(0)
    line = " ".join(rng.choice(words, size=200)) + "\n"  # ~ 800 characters
    with open(tmp_path / "big.txt", "w", encoding="utf-8") as f:
        for _ in range(megabytes * 2**20 // len(line)):
            f.write(line)
    (tmp_path / "short.txt").write_text(line * 4, encoding="utf-8")
    tokenizer = CharTokenizer([PAD, *sorted(set(line))])
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=128, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
    save_checkpoint(tmp_path / "ckpt", GPTModel(cfg), tokenizer)
    proc = subprocess.run([sys.executable, "-c", EVAL_CHILD, str(tmp_path / "ckpt"), str(tmp_path / "big.txt"),
                           str(tmp_path / "short.txt")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


# Read whole, as before, 40 MB of text took the text, its ids as a Python list (8 bytes an id) and as int64 (8 more),
# and the targets decoded again: over 700 MB (4 MB: over 70 MB). Streamed: a 4 MB piece read, 64 kB tokenized
# at a time, one batch of windows and the model's work on it. Measured on the development machine: 22 MB for
# 8 MB of text, 31 MB for 40 MB.
EVAL_BOUND = 48 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("megabytes", [4, pytest.param(40, marks=pytest.mark.slow)])
def test_eval_of_a_long_text_stays_within_a_bound(tmp_path, megabytes):
    m = eval_peak(tmp_path, megabytes)
    assert m["tokens"] > megabytes * 10**6
    assert m["peak"] < EVAL_BOUND, m


def test_a_text_shorter_than_a_window_says_how_long_a_text_must_be(tmp_path):
    # It said "too short for one window of context_length + 1 = 25", the code's name, without what would do.
    tok = CharTokenizer.from_text(TEXT)
    ckpt = save_checkpoint(tmp_path / "c", GPTModel(GPTConfig(vocab_size=tok.vocab_size, **SMALL)), tok)
    (tmp_path / "short.txt").write_text(TEXT[:10])
    with pytest.raises(ValueError, match=r"data has 10 tokens, .*; give a text of at least 25 tokens"):
        evaluate_checkpoint(ckpt, str(tmp_path / "short.txt"))
