"""Tests for build_llm.train.finetune: prompt format, masking, batching, loss weighting, classifier recipe,
data errors, and short end-to-end runs (classify and instruct, full and LoRA, resume, merge)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from build_llm import GPTModel
from build_llm.store.checkpoint import load_checkpoint
from build_llm.data.classify import collate_classification, read_labeled_csv
from build_llm.data.instruct import (ALPACA_PREAMBLE, IGNORE_INDEX, Example, collate_instruction, encode_conversation,
                                     format_input, read_instruction_data, render_pieces)
from build_llm.infer.chat import fit_conversation, respond
from build_llm.infer.classify import classify_texts, last_token_logits
from build_llm.store.finetuned import load_finetuned, merge_checkpoint, prepare_classifier
from build_llm.train.finetune import finetune, step_loss
from build_llm.train.config import FinetuneConfig
from build_llm.train.loop import TrainingStopped

from finetune_fixture import base, one_thread, tiny_cfg, tokenizer, write_classification_csv, write_instruct_json  # noqa: F401


# --- format and masking ---------------------------------------------------------------------------
def test_format_input_is_the_books_alpaca_prompt():
    entry = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
             "output": "The correct spelling is 'Occasion.'"}
    assert format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word.\n\n### Input:\nOcassion")
    assert format_input({**entry, "input": ""}).endswith("following word.")
    pieces = render_pieces([{"role": "user", "content": entry["instruction"] + "\n\n### Input:\nOcassion"},
                            {"role": "assistant", "content": entry["output"]}])
    assert pieces == [(format_input(entry) + "\n\n### Response:\n", False), (entry["output"], True)]


def test_chat_template_turns_and_generation_prompt():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    pieces = render_pieces(messages, add_generation_prompt=True)
    assert pieces == [("Be brief.\n\n### Instruction:\nhi\n\n### Response:\n", False), ("hello", True),
                      ("\n\n### Instruction:\nbye\n\n### Response:\n", False)]
    assert render_pieces(messages[:1] + messages[1:2], add_generation_prompt=True)[0][0].startswith("Be brief.")
    assert render_pieces(messages[1:2], add_generation_prompt=True)[0][0].startswith(ALPACA_PREAMBLE)


def test_encode_conversation_marks_responses_and_appends_eos(tokenizer):
    eos = tokenizer.eos_id
    messages = [{"role": "user", "content": "what colour"}, {"role": "assistant", "content": "red"}]
    ids, is_response = encode_conversation(messages, tokenizer, eos)
    n_response = len(tokenizer.encode("red")) + 1
    assert ids[-1] == eos and is_response == [False] * (len(ids) - n_response) + [True] * n_response
    assert tokenizer.decode(ids[:len(ids) - n_response]) == format_input({"instruction": "what colour"}) + \
        "\n\n### Response:\n"


def test_collate_instruction_masks_prompt_and_padding():
    a = Example([1, 2, 3, 4, 5], [False, False, False, True, True])
    b = Example([6, 7, 8], [False, True, True])
    x, y = collate_instruction([a, b], pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert y.tolist() == [[-100, -100, 4, 5], [7, 8, -100, -100]]
    x, y = collate_instruction([a, b], pad_id=0, max_length=2)
    assert x.tolist() == [[1, 2], [6, 7]] and y.tolist() == [[-100, -100], [7, 8]]


def test_the_books_cross_entropy_ignore_index_example():
    # Chapter 7 prints 1.1269 for two tokens, 0.7936 with a third, 1.1269 again with the third ignored.
    logits_1 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5]])
    logits_2 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
    assert round(F.cross_entropy(logits_1, torch.tensor([0, 1])).item(), 4) == 1.1269
    assert round(F.cross_entropy(logits_2, torch.tensor([0, 1, 1])).item(), 4) == 0.7936
    assert round(F.cross_entropy(logits_2, torch.tensor([0, 1, IGNORE_INDEX])).item(), 4) == 1.1269


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


def test_classification_reads_the_last_real_token():
    torch.manual_seed(0)
    model = prepare_classifier(GPTModel(tiny_cfg(50)), 3).eval()
    short, long = Example([5, 6, 7], 0), Example([8, 9, 10, 11, 12, 13], 2)
    x, lengths, labels = collate_classification([short, long], pad_id=0)
    with torch.no_grad():
        both = last_token_logits(model, x, lengths)
        alone = model(torch.tensor([[5, 6, 7]]))[0, -1]
    assert both.shape == (2, 3) and labels.tolist() == [0, 2]
    torch.testing.assert_close(both[0], alone, rtol=0, atol=1e-6)


def test_prepare_classifier_is_the_books_recipe():
    model = prepare_classifier(GPTModel(tiny_cfg(50)), 4)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("trf_blocks") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"out_head", "trf_blocks.1", "final_norm"}
    assert model.out_head.weight.shape == (4, 32) and model.out_head.bias is not None
    with pytest.raises(ValueError, match="num_classes"):
        prepare_classifier(GPTModel(tiny_cfg(50)), 1)


def test_prepare_classifier_can_train_every_weight():
    model = prepare_classifier(GPTModel(tiny_cfg(50)), 3, trainable="all")
    assert all(p.requires_grad for p in model.parameters()) and model.out_head.weight.shape == (3, 32)
    frozen = prepare_classifier(GPTModel(tiny_cfg(50)), 3, train_last_block=False, trainable="all")  # LoRA's
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["out_head.weight", "out_head.bias"]
    with pytest.raises(ValueError, match="trainable='head'"):
        prepare_classifier(GPTModel(tiny_cfg(50)), 3, trainable="head")
    for bad in ({"task": "instruct", "trainable": "all"},
                {"task": "classify", "trainable": "all", "lora_rank": 4, "lora_alpha": 8}):
        with pytest.raises(ValueError, match="trainable='all' applies to a classification fine-tune without LoRA"):
            FinetuneConfig(**bad)


# --- reading data ---------------------------------------------------------------------------------
def test_read_instruction_data_alpaca_json_and_chat_jsonl(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "x", "input": "", "output": "y"}]))
    convs, fmt = read_instruction_data(alpaca)
    assert fmt == "alpaca" and convs == [[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]
    chat = tmp_path / "c.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": m}) for m in (
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}],
    )) + "\n")
    convs, fmt = read_instruction_data(chat)
    assert fmt == "chat" and len(convs) == 2 and convs[1][0]["role"] == "system"


@pytest.mark.parametrize("content, message", [
    ("", "holds no records"),
    ("{not json}\n", "line 1 is not JSON"),
    (json.dumps([{"instruction": "x"}]), "expected an Alpaca record"),
    (json.dumps([{"instruction": 3, "output": "y"}]), "'instruction' must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "ending with assistant"),
    (json.dumps({"messages": [{"role": "bot", "content": "q"}]}), "role"),
    (json.dumps({"messages": [{"role": "assistant", "content": "q"}, {"role": "user", "content": "r"}]}), "alternating"),
])
def test_read_instruction_data_errors(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_instruction_data(path)


def test_read_labeled_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,extra\nhello there,a,1\n\"with, comma\",b,2\n")
    assert read_labeled_csv(path, "text", "label") == (["hello there", "with, comma"], ["a", "b"])
    with pytest.raises(ValueError, match=r"--text-column 'body' is not a column .* \['text', 'label', 'extra'\]"):
        read_labeled_csv(path, "body", "label")
    path.write_text("text,label\nhello,\n")
    with pytest.raises(ValueError, match="row 2: empty text or label"):
        read_labeled_csv(path, "text", "label")
    path.write_text("text,label\n")
    with pytest.raises(ValueError, match="has no rows"):
        read_labeled_csv(path, "text", "label")


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


def test_fit_conversation_drops_the_oldest_turns(tokenizer):
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": "what colour " * 3}, {"role": "assistant", "content": "red " * 3}]
    turns.append({"role": "user", "content": "cat"})
    full, _ = encode_conversation(turns, tokenizer, tokenizer.eos_id, add_generation_prompt=True)
    ids, dropped = fit_conversation(turns, tokenizer, tokenizer.eos_id, len(full) - 1)
    assert dropped == 1 and len(ids) < len(full)
    ids, dropped = fit_conversation(turns, tokenizer, tokenizer.eos_id, len(full))
    assert dropped == 0 and ids == full
    with pytest.raises(ValueError, match="send a shorter message"):
        fit_conversation(turns, tokenizer, tokenizer.eos_id, 5)
