"""Tests for build_llm.train.loop through pretraining (train.pretrain): config validation, schedule, the
loop on ABC and real text, exact resume, Ctrl-C, divergence."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
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


def nan_loss_at(monkeypatch, call: int) -> list[int]:
    """The loop's loss made NaN at its `call`-th computation; the list grows by one per computation."""
    real, calls = loop_mod.next_token_loss, []

    def loss(*args):
        calls.append(1)
        value = real(*args)
        return value * float("nan") if len(calls) == call else value

    monkeypatch.setattr(loop_mod, "next_token_loss", loss)
    return calls


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=4, steps=10, eval_every=2, eval_batches=1, seed=3, val_ratio=0.2)
    nan_loss_at(monkeypatch, 5)
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


# --- reading the losses every SYNC_EVERY steps --------------------------------------------------
TIMING_KEYS = ("elapsed_s", "tokens_per_s")


def same_rows(a: Path, b: Path, ignore: tuple[str, ...] = TIMING_KEYS) -> None:
    """The runs' metrics.jsonl rows are equal, apart from `ignore` (the clock's fields)."""
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in ignore} == {k: v for k, v in y.items() if k not in ignore}


def test_losses_read_every_4_steps_log_what_every_step_reads(tmp_path, monkeypatch):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=4, steps=10, eval_every=5, eval_batches=1, warmup_steps=2, seed=3, val_ratio=0.2)
    train(tmp_path / "every", tiny(5), cfg, corpus, tok, log=lambda s: None)
    monkeypatch.setitem(loop_mod.SYNC_EVERY, "cpu", 4)
    real, reads = loop_mod._read, []
    monkeypatch.setattr(loop_mod, "_read", lambda state, pending, log: (reads.append(state.step), real(state, pending, log)))
    train(tmp_path / "fourth", tiny(5), cfg, corpus, tok, log=lambda s: None)
    assert reads == [4, 5, 8, 10]  # every 4 steps, at each evaluation and at the last step
    same_rows(tmp_path / "every", tmp_path / "fourth")


def test_a_nan_found_at_a_later_read_names_its_own_step(tmp_path, monkeypatch):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=4, steps=8, eval_every=2, eval_batches=1, seed=3, val_ratio=0.2)
    monkeypatch.setitem(loop_mod.SYNC_EVERY, "cpu", 4)
    calls = nan_loss_at(monkeypatch, 3)
    with pytest.raises(TrainingStopped, match="loss is nan at step 3:") as e:
        train(tmp_path, tiny(5), cfg, corpus, tok, log=lambda s: None)
    assert e.value.exit_code == 1
    assert len(calls) == 4  # found at the read after step 4 (the evaluation's), before it evaluated or saved
    assert load_trainer_state(tmp_path).state["step"] == 2  # the last good checkpoint
    assert [r["step"] for r in rows(tmp_path)] == [2]


def test_ctrl_c_with_reads_every_4_steps_saves_and_resumes_exactly(tmp_path, monkeypatch):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=4, steps=10, eval_every=5, eval_batches=1, seed=4, val_ratio=0.2)
    full = train(tmp_path / "a", tiny(5), cfg, corpus, tok, log=lambda s: None)
    monkeypatch.setitem(loop_mod.SYNC_EVERY, "cpu", 4)
    interrupt_after(monkeypatch, 6)  # one process: its own flag stops it at the end of step 6, not at step 8
    with pytest.raises(TrainingStopped, match="interrupted at step 6/10") as e:
        train(tmp_path / "b", tiny(5), cfg, corpus, tok, log=lambda s: None)
    assert e.value.exit_code == 130 and load_trainer_state(tmp_path / "b").state["step"] == 6
    monkeypatch.setattr(train_mod, "train_step", loop_mod.train_step)
    resumed = train(tmp_path / "b", tiny(5), cfg, corpus, tok, resume=True, log=lambda s: None)
    # (a resumed row's train_loss is the mean of the steps since the resume: step 6's is not in row 10's)
    same_rows(tmp_path / "a", tmp_path / "b", ignore=TIMING_KEYS + ("train_loss",))
    for (k, va), vb in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


class CountingDist(train_mod.Dist):
    """Process 0 of 2 with no process group: a collective returns this process's own values and is
    recorded (the stop flag and last step of _agree are the float64 pairs)."""

    def __init__(self):
        super().__init__(0, 2, 0)
        self.sums: list[torch.Tensor] = []

    def sum(self, t):
        self.sums.append(t.clone())
        return t

    def barrier(self):
        pass

    def agreements(self) -> int:
        return sum(t.dtype == torch.float64 and t.numel() == 2 for t in self.sums)


def fake_run(tmp_path, d, steps: int, interrupt_at: int | None = None):
    """run_loop with a linear model whose step's loss is a tensor, under `d`; returns the steps saved."""
    core = torch.nn.Linear(2, 1)
    state = loop_mod.TrainState(core, core, torch.optim.SGD(core.parameters(), lr=0.1), total_steps=steps)
    saved = []

    def step(state, stop):
        if state.step + 1 == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.tensor(1.0 / (state.step + 1)), 1

    with loop_mod.RunLog(tmp_path, steps, state, d=d, log=lambda s: None) as log:
        loop_mod.run_loop(state, step, lr=lambda s: 0.1, evaluate=lambda s: {"val_loss": 1.0},
                          save=lambda s: saved.append(s.step), log=log, eval_every=steps, d=d)
    return saved, log


def test_under_torchrun_the_stop_flag_collective_runs_once_per_read(tmp_path, monkeypatch):
    monkeypatch.setitem(loop_mod.SYNC_EVERY, "cpu", 4)
    d = CountingDist()
    saved, log = fake_run(tmp_path / "a", d, steps=16)
    assert d.agreements() == 16 // 4 and saved == [16]
    assert log.history[-1]["train_loss"] == pytest.approx(np.mean([np.float32(1 / s) for s in range(1, 17)]))
    monkeypatch.setitem(loop_mod.SYNC_EVERY, "cpu", 1)
    d = CountingDist()
    fake_run(tmp_path / "b", d, steps=16)
    assert d.agreements() == 16


def test_under_torchrun_ctrl_c_stops_at_the_next_read(tmp_path, monkeypatch):
    monkeypatch.setitem(loop_mod.SYNC_EVERY, "cpu", 4)
    with pytest.raises(TrainingStopped, match="interrupted at step 8/16"):
        fake_run(tmp_path, CountingDist(), steps=16, interrupt_at=5)


# --- the prefetching loader ----------------------------------------------------------------------
class Synchronous:
    """A loader without a thread: each step's micro-batches drawn when the step asks."""

    def __init__(self, make, device):
        self.make = make

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def get(self, step, last):
        return list(self.make(step))


def prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("prefetch")]


def test_prefetched_batches_train_bit_identically_also_across_a_resume(tmp_path, monkeypatch):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=4, grad_accum=2, steps=8, eval_every=2, eval_batches=1, seed=6, val_ratio=0.2)
    model_cfg = tiny(5, drop_rate=0.2)
    real, drawn_by = train_mod.micro_batches, {}

    def draw(ids, step, *args):
        drawn_by[step] = threading.current_thread().name
        return real(ids, step, *args)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "Prefetcher", Synchronous)
        plain = train(tmp_path / "plain", model_cfg, cfg, corpus, tok, log=lambda s: None)
    monkeypatch.setattr(train_mod, "micro_batches", draw)
    interrupt_after(monkeypatch, 5)  # during step 5 (of 2 micro-batches): abandoned, step 6's batches being drawn
    with pytest.raises(TrainingStopped, match="interrupted during step 5/8"):
        train(tmp_path / "ahead", model_cfg, cfg, corpus, tok, log=lambda s: None)
    assert prefetch_threads() == []
    monkeypatch.setattr(train_mod, "train_step", loop_mod.train_step)
    ahead = train(tmp_path / "ahead", model_cfg, cfg, corpus, tok, resume=True, log=lambda s: None)
    # the first step of each run (0, and 4 for the resumed one) had nothing to overlap with; every other
    # step's batches were drawn on the thread, while the step before computed
    assert {s for s, name in drawn_by.items() if not name.startswith("prefetch")} == {0, 4}, drawn_by
    assert prefetch_threads() == []
    same_rows(tmp_path / "plain", tmp_path / "ahead", ignore=TIMING_KEYS + ("train_loss",))
    for (k, va), vb in zip(plain.model.state_dict().items(), ahead.model.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


def test_no_prefetch_thread_outlives_a_diverged_or_failed_run(tmp_path, monkeypatch):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=4, steps=6, eval_every=2, eval_batches=1, seed=3, val_ratio=0.2)
    real, calls = loop_mod.next_token_loss, []
    monkeypatch.setattr(loop_mod, "next_token_loss",
                        lambda *a: (calls.append(1), real(*a) * (float("nan") if len(calls) == 3 else 1.0))[1])
    with pytest.raises(TrainingStopped, match="diverged"):
        train(tmp_path / "nan", tiny(5), cfg, corpus, tok, log=lambda s: None)
    assert prefetch_threads() == []
    monkeypatch.undo()

    real = train_mod.micro_batches

    def broken(ids, step, *args):  # drawing a batch fails (a damaged token file), on the thread
        if step == 2:
            raise OSError("read error")
        return real(ids, step, *args)

    monkeypatch.setattr(train_mod, "micro_batches", broken)
    with pytest.raises(OSError, match="read error"):
        train(tmp_path / "broken", tiny(5), cfg, corpus, tok, log=lambda s: None)
    assert prefetch_threads() == []


def test_prefetcher_pins_on_the_thread_for_cuda(monkeypatch):
    """On CUDA the batches are pinned where they are drawn, off the training thread (mocked: no GPU)."""
    pinned_by = []

    def pin(t):
        pinned_by.append(threading.current_thread().name)
        return t

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    batch = (torch.arange(4), torch.arange(4) + 1)
    with loop_mod.Prefetcher(lambda step: [batch] * 2, torch.device("cuda", 0)) as loader:
        assert [loader.get(step, 3) for step in range(3)] == [[batch] * 2] * 3
    main = threading.current_thread().name
    assert pinned_by[:4] == [main] * 4  # step 0: nothing ran before it to overlap with
    assert len(pinned_by) == 12 and all(name.startswith("prefetch") for name in pinned_by[4:])
    assert prefetch_threads() == []


# --- float16: the gradient scaler's state in the checkpoint ---------------------------------------
def test_float16_resumed_equals_uninterrupted_scale_and_losses(tmp_path, monkeypatch):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=4, grad_accum=2, steps=8, eval_every=2, eval_batches=1, dtype="float16", seed=2,
                      val_ratio=0.2)
    # growing every 2 finite steps, halving at an overflow (float16 overflows at 65504): the scale moves both ways
    monkeypatch.setattr(train_mod, "grad_scaler", lambda dtype, device: torch.amp.GradScaler("cpu", growth_interval=2))
    full = train(tmp_path / "a", tiny(5), cfg, corpus, tok, log=lambda s: None)
    interrupt_after(monkeypatch, 5)
    with pytest.raises(TrainingStopped, match="interrupted during step 5/8"):
        train(tmp_path / "b", tiny(5), cfg, corpus, tok, log=lambda s: None)
    at_4 = load_trainer_state(tmp_path / "b").state["grad_scaler"]
    assert at_4 != torch.amp.GradScaler("cpu", growth_interval=2).state_dict()  # a fresh scaler would differ
    assert json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())["grad_scaler"] == at_4
    monkeypatch.setattr(train_mod, "train_step", loop_mod.train_step)
    resumed = train(tmp_path / "b", tiny(5), cfg, corpus, tok, resume=True, log=lambda s: None)
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in b] == [2, 4, 6, 8]
    for ra, rb in zip(a, b):  # the same losses, step for step (the rows after the resume average the same steps)
        assert (ra["train_loss"], ra["val_loss"], ra["lr"]) == (rb["train_loss"], rb["val_loss"], rb["lr"])
    assert load_trainer_state(tmp_path / "a").state["grad_scaler"] == load_trainer_state(tmp_path / "b").state["grad_scaler"]
    for (k, va), vb in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


def test_a_malformed_grad_scaler_state_is_refused(tmp_path):
    corpus, tok = abc_corpus(tmp_path)
    cfg = TrainConfig(batch_size=4, steps=2, eval_every=2, eval_batches=1, dtype="float16", seed=2, val_ratio=0.2)
    train(tmp_path, tiny(5), cfg, corpus, tok, log=lambda s: None)
    path = tmp_path / "checkpoint" / "trainer_state.json"
    state = json.loads(path.read_text())
    good = state["grad_scaler"]
    # {}: GradScaler.load_state_dict's RuntimeError (a traceback); a scale of 0, a backoff of 0 or a growth of 1:
    # a float16 run that never steps again (every scaled gradient 0 or infinite), reported as diverged
    for bad in ({"scale": "big"}, {**good, "scale": float("inf")}, [1], {}, {**good, "scale": 0.0},
                {**good, "backoff_factor": 0.0}, {**good, "growth_factor": 1.0}, {**good, "growth_interval": 0}):
        path.write_text(json.dumps({**state, "grad_scaler": bad}))
        with pytest.raises(ValueError, match="grad_scaler"):
            load_trainer_state(tmp_path)
