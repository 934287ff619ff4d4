"""train/pretrain.py, the `build-llm train` glue, scored with infer/evaluate.py: `--init-from` a Hugging
Face GPT-2 directory or a checkpoint of ours (weights, shape and tokenizer kept, a fresh optimizer, new
data), with --resume and its bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from build_llm.store.checkpoint import load_checkpoint, load_trainer_state
from build_llm.cli import main
from build_llm.infer.evaluate import evaluate_checkpoint

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

SMALL = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=32)
RUN = ["--steps", "1", "--lr", "1e-9", "--warmup-steps", "0", "--drop-rate", "0", "--batch-size", "4",
       "--eval-batches", "1"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's vocabulary, saved as transformers saves it (no tokenizer files)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    GPT2LMHeadModel(GPT2Config(**SMALL)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the king and queen of a far land rode out to see their people at the river".split()
    sentences = [" ".join(rng.choice(words, size=8)).capitalize() + "." for _ in range(400)]
    path = tmp_path_factory.mktemp("text") / "story.txt"
    path.write_text(" ".join(sentences), encoding="utf-8")
    return path


def hf_loss(hf_dir, text: str, context_length: int) -> float:
    """The Hugging Face model's own mean loss on the non-overlapping windows `eval` scores."""
    import tiktoken

    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ids = torch.tensor(tiktoken.get_encoding("gpt2").encode(text))
    n = (len(ids) - 1) // context_length
    x = ids[:n * context_length].view(n, context_length)
    y = ids[1:n * context_length + 1].view(n, context_length)
    with torch.no_grad():
        logits = model(x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def test_init_from_hf_starts_from_its_weights_and_keeps_its_tokenizer(tmp_path, capsys, hf_dir, text_file):
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--data", text_file, "--init-from", hf_dir, *RUN, "--out", run)
    assert code == 0, err
    ckpt = load_checkpoint(run)
    assert ckpt.tokenizer.vocab_size == 50257 and type(ckpt.tokenizer).__name__ == "GPT2Tokenizer"
    assert ckpt.model.cfg.emb_dim == 32 and ckpt.model.cfg.n_layers == 2
    # One step at lr 1e-9 leaves the weights as imported: our eval equals transformers' own loss.
    result = evaluate_checkpoint(run, str(text_file))
    ours, text = result["loss"], text_file.read_text(encoding="utf-8")
    reference = hf_loss(hf_dir, text, 32)
    assert abs(ours - reference) < 1e-4, (ours, reference)
    # Bits per character: transformers' total nats over the scored tokens / ln 2 / their characters.
    import tiktoken

    ids = tiktoken.get_encoding("gpt2").encode(text)
    scored = tiktoken.get_encoding("gpt2").decode(ids[1:result["tokens"] + 1])
    assert result["characters"] == len(scored) == result["bytes"]  # ASCII text
    assert result["bits_per_char"] == pytest.approx(reference * result["tokens"] / math.log(2) / len(scored), rel=1e-4)
    assert reference > 10  # a random GPT-2: about ln(50257)
    state = load_trainer_state(run).state
    assert state["step"] == 1 and state["data"]["vocab_size"] == 50257


def test_init_from_hf_loss_falls_and_resume_continues(tmp_path, capsys, hf_dir, text_file):
    run = tmp_path / "run"
    fast = [*RUN[:2], "--drop-rate", "0", "--batch-size", "8", "--eval-batches", "2",
            "--lr", "1e-2", "--warmup-steps", "2", "--eval-every", "5"]
    code, _, err = cli(capsys, "train", "--data", text_file, "--init-from", hf_dir, *fast, "--steps", "10", "--out", run)
    assert code == 0, err
    code, _, err = cli(capsys, "train", "--data", text_file, "--init-from", hf_dir, *fast, "--steps", "20",
                       "--resume", "--out", run)
    assert code == 0, err
    r = rows(run)
    assert [x["step"] for x in r] == [5, 10, 15, 20]
    before = hf_loss(hf_dir, text_file.read_text(encoding="utf-8"), 32)
    after = evaluate_checkpoint(run, str(text_file))["loss"]
    assert after < before - 2 and r[-1]["val_loss"] < r[0]["val_loss"], (before, after, r)
    assert load_checkpoint(run).tokenizer.encode(" the king") == [262, 5822]  # GPT-2's ids


def test_init_from_our_checkpoint(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    tiny = ["--context-length", "8", "--emb-dim", "32", "--n-layers", "1", "--n-heads", "2", "--batch-size", "8",
            "--eval-batches", "1"]
    assert cli(capsys, "train", "--abc", *tiny, "--steps", "60", "--eval-every", "60", "--out", first)[0] == 0
    trained = evaluate_checkpoint(first)["loss"]
    code, _, err = cli(capsys, "train", "--abc", "--init-from", first, "--steps", "1", "--lr", "1e-9",
                       "--warmup-steps", "0", "--batch-size", "8", "--eval-batches", "1", "--out", second)
    assert code == 0, err
    assert evaluate_checkpoint(second)["loss"] == pytest.approx(trained, abs=1e-5)
    assert trained < math.log(5) - 0.2  # it learned something, so equality is not the random start's
    assert load_trainer_state(second).state["step"] == 1  # a fresh run, not a resumed one


@pytest.mark.parametrize("extra, message", [
    (["--emb-dim", "64"], "--emb-dim 64 contradicts the model's emb_dim=32"),
    (["--preset", "gpt2-small"], "--init-from and --preset gpt2-small both give the model's shape"),
    (["--tokenizer", "char"], "keeps its own tokenizer"),
])
def test_init_from_contradictions_are_one_line(tmp_path, capsys, hf_dir, text_file, extra, message):
    code, out, err = cli(capsys, "train", "--data", text_file, "--init-from", hf_dir, *extra, "--out", tmp_path / "r")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_init_from_missing_directory(tmp_path, capsys, text_file):
    code, _, err = cli(capsys, "train", "--data", text_file, "--init-from", tmp_path / "nope", "--out", tmp_path / "r")
    assert code == 2 and "--init-from" in err and "not a directory" in err
