"""Tests for build_llm.train.loop through pretraining (train.pretrain): config validation, schedule, the
loop on ABC and real text, exact resume, Ctrl-C, divergence."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import build_llm.train.loop as loop_mod
import build_llm.train.pretrain as train_mod
from build_llm import GPTConfig, GPTModel
from build_llm.store.checkpoint import load_checkpoint, load_trainer_state
from build_llm.data.corpus import prepare_corpus
from build_llm.data.markov import ABC, optimal_loss
from build_llm.train.loop import TrainingStopped, lr_at
from build_llm.train.pretrain import train
from build_llm.train.config import TrainConfig

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "shakespeare.txt"
PARAGRAPH = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.\n"
)


def tiny(vocab: int, **kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=vocab, context_length=8, emb_dim=32, n_heads=2, n_layers=1,
                               drop_rate=0.1, qkv_bias=True), **kw})


pytestmark = pytest.mark.usefixtures("one_thread")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("change, key", [
    (dict(lr=0), "lr"), (dict(lr=float("nan")), "lr"), (dict(weight_decay=-1), "weight_decay"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(0.9,)), "betas"), (dict(batch_size=0), "batch_size"),
    (dict(steps=0), "steps"), (dict(grad_accum=0), "grad_accum"), (dict(val_ratio=1.0), "val_ratio"),
    (dict(dtype="float64"), "dtype"), (dict(lr_decay="linear"), "lr_decay"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(grad_clip=-0.5), "grad_clip"), (dict(seed=True), "seed"),
])
def test_train_config_rejects(change, key):
    with pytest.raises(ValueError, match=f"{key}="):
        TrainConfig(**change)


def test_train_config_json_round_trip():
    cfg = TrainConfig(lr=0.01, betas=(0.8, 0.9), steps=7)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"learning_rate": 1})


def test_lr_schedule_is_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == 1.0
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg) == pytest.approx(0.1)
    assert lr_at(10, TrainConfig(lr=0.5, warmup_steps=0, lr_decay="constant")) == 0.5


def test_weight_decay_only_on_matrices():
    model = GPTModel(tiny(5))
    opt = loop_mod.make_optimizer(model, TrainConfig(weight_decay=0.3), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.3 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name


def test_abc_loss_falls_towards_the_optimum(tmp_path):
    """A short version of the demo: the r-abc model on ABC text gets within 0.12 nats of the exact
    optimum in 150 steps (the full demo, a slow test, gets within 0.01)."""
    corpus, tok = prepare_corpus(None, "char", tmp_path / "data", 0.2, abc_words=20_000)
    cfg = TrainConfig(lr=0.003, weight_decay=0.01, betas=(0.9, 0.999), warmup_steps=20, batch_size=64, steps=150,
                      eval_every=75, eval_batches=4, seed=1, val_ratio=0.2)
    model_cfg = GPTConfig.from_preset("r-abc")
    optimum = optimal_loss(ABC, 16)
    result = train(tmp_path, model_cfg, cfg, corpus, tok, optimal_loss=optimum, log=lambda s: None)
    first, last = rows(tmp_path)[0], rows(tmp_path)[-1]
    assert last["optimal_loss"] == optimum
    assert last["val_loss"] < first["val_loss"] < math.log(4)  # a uniform guess over A, B, C, \n
    assert optimum - 0.03 < result.val_loss < optimum + 0.12, (result.val_loss, optimum)
    for key in ("step", "train_loss", "val_loss", "tokens_seen", "lr", "elapsed_s", "tokens_per_s"):
        assert key in last
    assert last["tokens_seen"] == 150 * 64 * 16
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_loss_falls_on_real_text(tmp_path):
    path = tmp_path / "text.txt"
    if SHAKESPEARE.is_file():
        path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    else:  # the shared corpus is absent: a paragraph of Austen, repeated, still has structure to learn
        path.write_text(PARAGRAPH * 40, encoding="utf-8")
    corpus, tok = prepare_corpus(path, "char", tmp_path / "data", 0.1)
    cfg = TrainConfig(lr=3e-3, warmup_steps=10, batch_size=32, steps=80, eval_every=40, eval_batches=4, seed=0)
    result = train(tmp_path / "run", tiny(tok.vocab_size, context_length=32, emb_dim=64), cfg, corpus, tok,
                   log=lambda s: None)
    history = rows(tmp_path / "run")
    assert history[-1]["val_loss"] < math.log(tok.vocab_size) - 0.8  # well below a uniform guess
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result.step == 80


def test_bits_per_character_and_byte_beside_the_loss(tmp_path):
    """Tokenizer-independent rows: total nats / ln 2 / characters (bytes) of the validation text."""
    path = tmp_path / "text.txt"
    path.write_text(PARAGRAPH.replace("a", "ä").replace("o", "ø") * 6, encoding="utf-8")  # 2-byte letters
    corpus, tok = prepare_corpus(path, "char", tmp_path / "data", 0.2)
    cfg = TrainConfig(batch_size=8, steps=2, eval_every=2, eval_batches=2, warmup_steps=0, seed=0, val_ratio=0.2)
    train(tmp_path / "run", tiny(tok.vocab_size), cfg, corpus, tok, log=lambda s: None)
    row = rows(tmp_path / "run")[-1]
    val_text = path.read_text(encoding="utf-8")[-len(corpus.val):]  # one character per token
    assert row["val_bits_per_char"] == pytest.approx(row["val_loss"] / math.log(2), rel=1e-12)
    n_bytes = len(val_text.encode("utf-8"))
    assert n_bytes > len(val_text) * 1.05
    assert row["val_bits_per_byte"] == pytest.approx(row["val_loss"] * len(val_text) / math.log(2) / n_bytes, rel=1e-12)


def abc_corpus(tmp_path, words=3000):
    return prepare_corpus(None, "char", tmp_path / "data", 0.2, abc_words=words)


def interrupt_after(monkeypatch, n_steps: int) -> None:
    """Send this process SIGINT (as Ctrl-C would) during the n-th training step."""
    real, calls = train_mod.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == n_steps:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step)


def test_ctrl_c_saves_and_resume_equals_no_stop(tmp_path, monkeypatch):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(lr=3e-3, warmup_steps=3, batch_size=8, grad_accum=2, steps=10, eval_every=1, eval_batches=2,
                      seed=5, val_ratio=0.2)
    model_cfg = tiny(5, drop_rate=0.2)
    full = train(tmp_path / "a", model_cfg, cfg, corpus, tok, log=lambda s: None)

    # The handler before the run: Python's default_int_handler, or SIG_IGN when pytest was started in
    # the background of a non-interactive shell (which ignores SIGINT for its background jobs).
    before = signal.getsignal(signal.SIGINT)
    interrupt_after(monkeypatch, 4)  # during step 4 (2 micro-batches): it is abandoned after the first
    with pytest.raises(TrainingStopped, match="interrupted during step 4/10") as e:
        train(tmp_path / "b", model_cfg, cfg, corpus, tok, log=lambda s: None)
    assert e.value.exit_code == 130
    assert load_trainer_state(tmp_path / "b").state["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    monkeypatch.undo()
    resumed = train(tmp_path / "b", model_cfg, cfg, corpus, tok, resume=True, log=lambda s: None)

    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):  # the same losses, step for step
        assert ra["train_loss"] == rb["train_loss"] and ra["val_loss"] == rb["val_loss"], (ra, rb)
        assert ra["lr"] == rb["lr"]
    for (k, va), vb in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


def test_resume_after_the_last_checkpoint_drops_later_rows(tmp_path, monkeypatch):
    """Rows logged after the checkpoint a run resumes from are replaced, not duplicated."""
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=4, steps=6, eval_every=2, eval_batches=1, warmup_steps=0, seed=3, val_ratio=0.2)
    train(tmp_path, tiny(5), cfg, corpus, tok, log=lambda s: None)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    state_step = load_trainer_state(tmp_path).state["step"]
    assert state_step == 6 and len(lines) == 3
    train(tmp_path, tiny(5), cfg.replace(steps=8), corpus, tok, resume=True, log=lambda s: None)
    assert [r["step"] for r in rows(tmp_path)] == [2, 4, 6, 8]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=4, steps=10, eval_every=2, eval_batches=1, seed=3, val_ratio=0.2)
    real, calls = loop_mod.next_token_loss, []

    def loss(*args):
        calls.append(1)
        value = real(*args)
        return value * float("nan") if len(calls) == 5 else value

    monkeypatch.setattr(loop_mod, "next_token_loss", loss)
    with pytest.raises(TrainingStopped, match="loss is nan at step 5") as e:
        train(tmp_path, tiny(5), cfg, corpus, tok, log=lambda s: None)
    assert e.value.exit_code == 1
    assert load_trainer_state(tmp_path).state["step"] == 4
    model = load_checkpoint(tmp_path).model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bfloat16_autocast_trains(tmp_path):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=8, steps=4, eval_every=4, eval_batches=1, dtype="bfloat16", seed=1, val_ratio=0.2)
    result = train(tmp_path, tiny(5), cfg, corpus, tok, log=lambda s: None)
    assert math.isfinite(result.val_loss)
    assert next(load_checkpoint(tmp_path).model.parameters()).dtype == torch.float32  # weights stay fp32


def test_batch_size_must_divide_among_processes(tmp_path):
    corpus, tok = abc_corpus(tmp_path)
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        train(tmp_path, tiny(5), TrainConfig(batch_size=5, val_ratio=0.2), corpus, tok, d=train_mod.Dist(0, 2, 0))


def test_a_gradient_scaler_changes_no_update(tmp_path):
    """train_step with a GradScaler: the scaled gradients are unscaled before clipping, so the step
    equals the one without it (scales are powers of two: exact in float32)."""
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=8, grad_clip=0.01, grad_accum=2, seed=1, val_ratio=0.2)  # clipping binds
    batches = list(train_mod.micro_batches(corpus.train, 0, cfg, 8, train_mod.Dist()))
    models = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        torch.manual_seed(0)
        model = GPTModel(tiny(5, drop_rate=0.0))
        optimizer = loop_mod.make_optimizer(model, cfg, torch.device("cpu"))
        loss = loop_mod.train_step(model, optimizer, batches, torch.device("cpu"), cfg, train_mod.Dist(), scaler=scaler)
        models.append((model, float(loss)))
    (a, loss_a), (b, loss_b) = models
    assert loss_a == loss_b
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_float16_training_uses_a_gradient_scaler(tmp_path):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=8, steps=4, eval_every=4, eval_batches=1, dtype="float16", seed=1, val_ratio=0.2)
    assert loop_mod.grad_scaler("float16", torch.device("cpu")) is not None
    assert loop_mod.grad_scaler("bfloat16", torch.device("cpu")) is None
    result = train(tmp_path, tiny(5), cfg, corpus, tok, log=lambda s: None)
    assert math.isfinite(result.val_loss)
    assert next(load_checkpoint(tmp_path).model.parameters()).dtype == torch.float32  # weights stay fp32
