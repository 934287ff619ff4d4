"""Tests for build_llm.train.finetune: loss weighting, config validation, and short end-to-end runs
(classify and instruct, full and LoRA, resume, merge). The pieces it trains with are tested beside
them: tests/data/test_instruct.py, tests/data/test_classify.py, tests/store/test_finetuned.py,
tests/infer/test_classify_texts.py, tests/infer/test_chat.py."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from build_llm import GPTModel
from build_llm.data.instruct import IGNORE_INDEX, Example, collate_instruction
from build_llm.infer.chat import respond
from build_llm.infer.classify import classify_texts
from build_llm.store.checkpoint import load_checkpoint
from build_llm.store.finetuned import load_finetuned, merge_checkpoint
from build_llm.train.config import FinetuneConfig
from build_llm.train.finetune import finetune, step_loss
from build_llm.train.loop import TrainingStopped

from tiny import tiny_cfg, write_classification_csv, write_instruct_json

pytestmark = pytest.mark.usefixtures("one_thread")


# --- loss weighting -------------------------------------------------------------------------------
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_weights_micro_batches_by_their_tokens():
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg(50))
    g = torch.Generator().manual_seed(1)
    examples = []
    for n, k in ((20, 3), (9, 6), (14, 1), (30, 12)):  # very different response lengths
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        examples.append(Example(ids, [False] * (n - k) + [True] * k))
    # Reference: the mean over every response token of the step, computed in one go.
    x, y = collate_instruction(examples, pad_id=0)
    logits = model(x)
    mean = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    mean.backward()
    expected = _grads(model)
    model.zero_grad()
    loss, tokens = step_loss(model, examples, "instruct", 0, 64, micro_batch_size=1, device=torch.device("cpu"))
    assert tokens == 3 - 1 + 6 - 1 + 1 - 1 + 12 - 1 + 4  # the first response token is predicted from the prompt
    assert loss == pytest.approx(mean.item(), rel=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6)


# --- settings ------------------------------------------------------------------------------------
def test_trainable_all_is_for_a_classification_fine_tune_without_lora():
    # (prepare_classifier's own trainable="all": tests/store/test_finetuned.py)
    for bad in ({"task": "instruct", "trainable": "all"},
                {"task": "classify", "trainable": "all", "lora_rank": 4, "lora_alpha": 8}):
        with pytest.raises(ValueError, match="trainable='all' applies to a classification fine-tune without LoRA"):
            FinetuneConfig(**bad)


def test_config_validation():
    with pytest.raises(ValueError, match="task"):
        FinetuneConfig(task="summarise")
    with pytest.raises(ValueError, match="does not divide"):
        FinetuneConfig(task="instruct", batch_size=8, micro_batch_size=3)
    with pytest.raises(ValueError, match="go together"):
        FinetuneConfig(task="instruct", lora_rank=4)
    with pytest.raises(ValueError, match="targets"):
        FinetuneConfig(task="instruct", lora_rank=4, lora_alpha=8, lora_targets=("mlp",))


# --- end to end -----------------------------------------------------------------------------------
def test_finetune_classify_end_to_end(base, tmp_path):
    data = tmp_path / "train.csv"
    write_classification_csv(data)
    cfg = FinetuneConfig(task="classify", epochs=6, batch_size=8, lr=3e-3, val_fraction=0.25, seed=1)
    result = finetune(tmp_path / "run", base, cfg, data=data, log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1] == {k: v for k, v in result.items() if k not in ("trainable_parameters", "parameters")}
    assert len(rows) == 6 and rows[-1]["val_accuracy"] >= 0.9 and rows[-1]["val_loss"] < rows[0]["val_loss"]
    ft = load_finetuned(tmp_path / "run")
    assert ft.meta["labels"] == ["animal", "colour", "fruit"]
    out = classify_texts(ft.model, ft.tokenizer, ft.meta["labels"], ["the dog is dog", "the plum is a plum"])
    assert [o["label"] for o in out] == ["animal", "fruit"]
    assert sum(out[0]["probabilities"].values()) == pytest.approx(1.0)


def test_finetune_instruct_full_and_lora_then_merge(base, tmp_path):
    data = tmp_path / "train.json"
    write_instruct_json(data)
    full = finetune(tmp_path / "full", base, FinetuneConfig(task="instruct", epochs=8, batch_size=8, lr=3e-3),
                    data=data, log=lambda s: None)
    ft = load_finetuned(tmp_path / "full")
    assert ft.meta["format"] == "alpaca" and not ft.meta["lora"]
    question = [{"role": "user", "content": "what is the word\n\n### Input:\ndog"}]
    assert respond(ft.model, ft.tokenizer, question, 8) == "animal"

    lora_cfg = FinetuneConfig(task="instruct", epochs=8, batch_size=8, lr=1e-2, lora_rank=4, lora_alpha=8)
    lora = finetune(tmp_path / "lora", base, lora_cfg, data=data, log=lambda s: None)
    assert lora["trainable_parameters"] < 0.2 * full["trainable_parameters"]
    ckpt = tmp_path / "lora" / "checkpoint"
    adapter = json.loads((ckpt / "adapter.json").read_text())
    assert adapter["token_rows"] == [load_checkpoint(base).tokenizer.eos_id]  # the end token learns its rows
    assert (ckpt / "adapter.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    adapted = load_finetuned(tmp_path / "lora")
    merge_checkpoint(tmp_path / "lora", tmp_path / "merged")
    merged = load_checkpoint(tmp_path / "merged").model  # a plain checkpoint
    x = torch.randint(0, adapted.tokenizer.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted.model(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a LoRA run"):
        merge_checkpoint(tmp_path / "full", tmp_path / "merged2")


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(base, tmp_path, monkeypatch):
    data = tmp_path / "train.csv"
    write_classification_csv(data, 8)
    cfg = FinetuneConfig(task="classify", epochs=3, batch_size=4, lr=3e-3, eval_every=2, seed=5, lora_rank=2,
                         lora_alpha=4)
    whole = finetune(tmp_path / "whole", base, cfg, data=data, log=lambda s: None)

    import build_llm.train.finetune as ft_module

    evaluate, calls = ft_module.evaluate, []

    def evaluate_then_interrupt(*args, **kw):  # after the evaluation at step 4, Ctrl-C
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the loop saves and stops
        return evaluate(*args, **kw)

    monkeypatch.setattr(ft_module, "evaluate", evaluate_then_interrupt)
    with pytest.raises(TrainingStopped) as stopped:
        finetune(tmp_path / "split", base, cfg, data=data, log=lambda s: None)
    monkeypatch.setattr(ft_module, "evaluate", evaluate)
    assert stopped.value.exit_code == 130
    resumed = finetune(tmp_path / "split", base, cfg, data=data, resume=True, log=lambda s: None)
    assert resumed["step"] == whole["step"]
    a, b = load_finetuned(tmp_path / "whole").model, load_finetuned(tmp_path / "split").model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text().count("\n") == \
        (tmp_path / "split" / "metrics.jsonl").read_text().count("\n")
