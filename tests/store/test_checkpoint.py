"""Tests for the trainer-state part of build_llm.store.checkpoint: what a training checkpoint holds, that it
loads without pickle, and that a process killed at any instant leaves a loadable checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from build_llm.store.checkpoint import load_checkpoint, load_trainer_state, resolve_checkpoint
from build_llm.data.corpus import prepare_corpus
from build_llm.train.pretrain import train
from build_llm.train.config import TrainConfig
from build_llm import GPTConfig

TINY = ["--context-length", "8", "--emb-dim", "32", "--n-layers", "1", "--n-heads", "2"]


def test_training_checkpoint_contents(tmp_path):
    corpus, tok = prepare_corpus(None, "char", tmp_path / "data", 0.2, abc_words=2000)
    cfg = TrainConfig(batch_size=4, steps=3, eval_every=3, eval_batches=1, seed=9, val_ratio=0.2)
    model_cfg = GPTConfig(vocab_size=5, context_length=8, emb_dim=16, n_heads=2, n_layers=1)
    result = train(tmp_path, model_cfg, cfg, corpus, tok, log=lambda s: None)
    ckpt = tmp_path / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([
        ".build-llm", "config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "rng.safetensors",
        "trainer_state.json"])
    saved = load_trainer_state(tmp_path)
    assert saved.state["step"] == 3 and saved.state["tokens_seen"] == 3 * 4 * 8
    assert TrainConfig.from_dict(saved.state["train_config"]) == cfg
    assert saved.state["data"]["source"] == "abc" and saved.state["data"]["n_tokens"] == corpus.meta["n_tokens"]
    assert saved.rng["torch_cpu"].dtype == torch.uint8
    names = {n for n, _ in result.model.named_parameters()}
    assert set(saved.optimizer["state"]) == names  # every parameter's Adam moments, keyed by name
    for name in names:
        assert set(saved.optimizer["state"][name]) == {"step", "exp_avg", "exp_avg_sq"}
    assert [set(g["params"]) for g in saved.optimizer["param_groups"]] and saved.optimizer["param_groups"][0]["betas"] == cfg.betas
    assert all(not k.startswith("_orig_mod") for k in load_file(ckpt / "model.safetensors"))
    model = load_checkpoint(tmp_path).model
    for (k, a), b in zip(result.model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_truncated_trainer_state_is_a_clear_error(tmp_path):
    corpus, tok = prepare_corpus(None, "char", tmp_path / "data", 0.2, abc_words=2000)
    cfg = TrainConfig(batch_size=4, steps=1, eval_every=1, eval_batches=1, val_ratio=0.2)
    train(tmp_path, GPTConfig(vocab_size=5, context_length=8, emb_dim=16, n_heads=2, n_layers=1), cfg, corpus, tok,
          log=lambda s: None)
    opt = tmp_path / "checkpoint" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:50])
    with pytest.raises(ValueError, match="trainer state is unreadable or truncated"):
        load_trainer_state(tmp_path)
    opt.unlink()
    with pytest.raises(ValueError, match="no optimizer.safetensors"):
        load_trainer_state(tmp_path)


def test_sigkill_at_any_instant_leaves_a_loadable_checkpoint(tmp_path):
    """Kill a training process (checkpointing every step) at random moments, three times, resuming in
    between: each time the newest complete checkpoint loads, model and trainer state alike."""
    run = tmp_path / "run"
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps_seen = []
    for attempt in range(3):
        cmd = [sys.executable, "-m", "build_llm.cli", "train", "--out", str(run), "--steps", "100000",
               "--eval-every", "1", "--eval-batches", "1", "--batch-size", "4", *TINY]
        if attempt:
            cmd.append("--resume")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            deadline = time.monotonic() + 60
            start = len(steps_seen) and steps_seen[-1]
            while time.monotonic() < deadline:  # wait until this process has saved a few checkpoints
                metrics = run / "metrics.jsonl"
                rows = metrics.read_text().splitlines() if metrics.exists() else []
                if rows and json.loads(rows[-1])["step"] >= start + 3:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        path = resolve_checkpoint(run)
        model = load_checkpoint(run).model
        state = load_trainer_state(run)
        assert state.path == path and state.state["step"] >= 1
        assert model.cfg.context_length == 8
        steps_seen.append(state.state["step"])
    assert steps_seen == sorted(steps_seen)
