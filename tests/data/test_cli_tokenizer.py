"""`build-llm tokenizer train` and `build-llm tokenizer stats`, end to end."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from build_llm import BPETokenizer, GPTModel, get_tokenizer, load_checkpoint, save_checkpoint
from build_llm.cli import main
from tiny import TINY

WORDS = ("o gato dorme no telhado enquanto a chuva cai sobre a cidade e as crianças não sabem se "
         "amanhã haverá aula porque o ônibus quebrou perto da estação então ninguém pôde chegar à "
         "escola antes das nove horas da manhã").split()


def portuguese(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        k = rng.randint(5, 15)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + rng.choice(".!?"))
        words += k
    return "\n".join(sentences) + "\n"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(portuguese(8000, seed=0), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "pt.json"
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    return out


def test_train_writes_a_hugging_face_byte_level_bpe(trained, corpus, capsys):
    raw = HFTokenizer.from_file(str(trained))  # read by the library itself, not by our wrapper
    assert raw.get_vocab_size() == 400
    assert raw.token_to_id("<|endoftext|>") is not None
    ours = get_tokenizer(str(trained))  # what `train --tokenizer FILE` and checkpoints use
    assert isinstance(ours, BPETokenizer) and ours.vocab_size == 400
    text = corpus.read_text(encoding="utf-8")[:2000]
    assert ours.encode(text) == raw.encode(text, add_special_tokens=False).ids


def test_train_prints_one_line(corpus, tmp_path, capsys):
    code, out, err = run(capsys, "tokenizer", "train", "--data", corpus, "--vocab-size", 300, "--out", tmp_path / "t.json")
    assert code == 0, err
    assert out == f"{tmp_path / 't.json'}: byte-level BPE, 300 ids (eos <|endoftext|> = 0)\n"


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200))
def test_cli_trained_tokenizer_round_trips_any_text(trained, text):
    tok = get_tokenizer(str(trained))
    assert tok.decode(tok.encode(text)) == text


def test_a_portuguese_tokenizer_cuts_portuguese_text_into_fewer_tokens(trained, tmp_path, capsys):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(portuguese(2000, seed=1), encoding="utf-8")
    code, out, err = run(capsys, "tokenizer", "stats", "--data", held_out, "--tokenizer", trained, "--json")
    assert code == 0, err
    rows = {r["tokenizer"]: r for r in json.loads(out)}
    assert rows[str(trained)]["tokens_per_char"] < 0.8 * rows["gpt2"]["tokens_per_char"]


def test_the_trained_tokenizer_is_saved_inside_a_checkpoint(trained, tmp_path):
    tok = get_tokenizer(str(trained))
    model = GPTModel(TINY.replace(vocab_size=tok.vocab_size))
    save_checkpoint(tmp_path / "ckpt", model, tok)
    again = load_checkpoint(tmp_path / "ckpt").tokenizer
    text = "A chuva cai sobre a cidade, e ninguém pôde chegar."
    assert again.encode(text) == HFTokenizer.from_file(str(trained)).encode(text, add_special_tokens=False).ids


def test_train_on_a_directory_of_text_files(tmp_path, capsys):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text(portuguese(500, 2), encoding="utf-8")
    (tmp_path / "docs" / "sub" / "b.txt").write_text(portuguese(500, 3), encoding="utf-8")
    code, _, err = run(capsys, "tokenizer", "train", "--data", tmp_path / "docs", "--vocab-size", 300,
                       "--out", tmp_path / "out" / "tok.json")
    assert code == 0, err
    assert HFTokenizer.from_file(str(tmp_path / "out" / "tok.json")).get_vocab_size() == 300


def test_stats(trained, corpus, capsys):
    text = corpus.read_text(encoding="utf-8")
    code, out, err = run(capsys, "tokenizer", "stats", "--data", corpus, "--tokenizer", trained, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["tokenizer"] for r in rows] == ["gpt2", "char", str(trained)]
    n_bytes = len(text.encode("utf-8"))
    assert all(r["characters"] == len(text) and r["bytes"] == n_bytes for r in rows)
    gpt2, char, bpe = rows
    assert (char["tokens"], char["vocab_size"], char["tokens_per_char"]) == (len(text), len(set(text)) + 1, 1.0)
    assert gpt2["vocab_size"] == 50257
    assert bpe["tokens"] == len(HFTokenizer.from_file(str(trained)).encode(text, add_special_tokens=False).ids)
    for r in rows:
        assert r["tokens_per_char"] == pytest.approx(r["tokens"] / len(text))
        assert r["bytes_per_token"] == pytest.approx(n_bytes / r["tokens"])

    code, table, err = run(capsys, "tokenizer", "stats", "--data", corpus, "--tokenizer", trained)
    assert code == 0 and err == ""
    lines = table.splitlines()
    assert lines[0].split() == ["tokenizer", "vocab", "tokens", "tokens/char", "bytes/token"]
    assert [line.split()[:3] for line in lines[1:]] == [[r["tokenizer"], str(r["vocab_size"]), str(r["tokens"])]
                                                         for r in rows]


def test_bad_input_is_one_line_exit_2_and_leaves_files_alone(corpus, trained, tmp_path, capsys):
    out = tmp_path / "keep.json"
    out.write_text("previous")
    (tmp_path / "latin1.txt").write_bytes("ação e coração ".encode("latin-1") * 10)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nodocs").mkdir()
    train = ["tokenizer", "train", "--vocab-size", 300, "--out"]
    cases = [
        ([*train[:2], "--data", corpus, "--vocab-size", 256, "--out", out], "--vocab-size 256 is too small"),
        ([*train[:2], "--data", corpus, "--vocab-size", 0, "--out", out], "expected an integer >= 1"),
        ([*train, out, "--data", tmp_path / "missing.txt"], "does not exist"),
        ([*train, out, "--data", tmp_path / "nodocs"], "has no files"),
        ([*train, out, "--data", tmp_path / "latin1.txt"], "is not valid UTF-8"),
        ([*train, out, "--data", tmp_path / "empty.txt"], "--data is empty"),
        ([*train, tmp_path, "--data", corpus], "is a directory; give a file path"),
        (["tokenizer", "stats", "--data", tmp_path / "missing.txt"], "does not exist"),
        (["tokenizer", "stats", "--data", tmp_path / "latin1.txt"], "is not valid UTF-8"),
        (["tokenizer", "stats", "--data", tmp_path / "empty.txt"], "is empty"),
        (["tokenizer", "stats", "--data", corpus, "--tokenizer", tmp_path / "nope.json"], "does not exist"),
        (["tokenizer", "stats", "--data", corpus, "--tokenizer", tmp_path / "latin1.txt"], "does not parse as JSON"),
        (["tokenizer"], "required"),
    ]
    for argv, words in cases:
        code, stdout, err = run(capsys, *argv)
        assert code == 2, argv
        assert stdout == "" and err.count("\n") == 1 and words in err, (argv, err)
    assert out.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "keep.json", "latin1.txt", "nodocs"]


def test_a_trained_tokenizer_trains_a_model_that_exports_to_hugging_face(trained, corpus, tmp_path, capsys):
    """tokenizer train -> train --tokenizer FILE -> export-hf: the same ids and logits in transformers."""
    transformers = pytest.importorskip("transformers")
    import torch

    code, _, err = run(capsys, "train", "--data", corpus, "--tokenizer", trained, "--steps", 2, "--eval-every", 2,
                       "--eval-batches", 1, "--batch-size", 2, "--context-length", 16, "--emb-dim", 16,
                       "--n-layers", 1, "--n-heads", 2, "--device", "cpu", "--out", tmp_path / "run")
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "run")
    text = "A chuva cai sobre a cidade."
    ids = HFTokenizer.from_file(str(trained)).encode(text, add_special_tokens=False).ids
    assert ckpt.tokenizer.encode(text) == ids
    code, _, err = run(capsys, "export-hf", "--checkpoint", tmp_path / "run", "--out", tmp_path / "hf")
    assert code == 0, err
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == ids
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ckpt.model(idx), atol=1e-5, rtol=0)
