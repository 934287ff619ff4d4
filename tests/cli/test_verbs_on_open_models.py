"""Every CLI verb on an imported tiny random model of each open family (llama, mistral, qwen2, qwen3,
qwen3_moe, gemma3_text): transformers makes the model and a tiny tokenizer with a chat template,
`import-hf` brings them in, and each verb runs on the import (exit 0, the output it should give). The
fine-tuned and merged results go back out through `export-hf` and load in transformers with the same
logits. Two families run in `make test`; the others are marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import build_llm.cli.serve as serve_cli
from build_llm.cli import main
from build_llm.infer.generate import generate
from build_llm.infer.quant import CompiledStep
from build_llm.serve import Sequence
from build_llm.serve.engine import Engine
from build_llm.store.checkpoint import load_checkpoint
from build_llm.store.finetuned import load_finetuned
from tiny import CHATML_TEMPLATE, write_chat_tokenizer, write_classification_csv, write_instruct_json

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)
FAMILIES = {
    "llama": dict(tie_word_embeddings=True),
    "mistral": dict(sliding_window=8),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),
    "gemma3_text": dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
}
QUICK = ("llama", "qwen3_moe")  # in `make test`; the others in `make test-slow`
TEXT = "Hello there, how are you today? I am fine, thank you. What is the capital of France? Paris is the capital. "
CHECKS = ["info", "generate", "eval", "inspect", "surprisal", "doctor", "train", "finetune", "chat"]


def families():
    return [pytest.param(f, marks=() if f in QUICK else pytest.mark.slow) for f in FAMILIES]


@pytest.fixture(scope="module", params=families())
def imported(request, tmp_path_factory):
    """(family, a directory of data files, the import of a tiny random transformers model of the family)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    tok = write_chat_tokenizer(root / "hf", CHATML_TEMPLATE, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = AutoConfig.for_model(family, vocab_size=len(tok), eos_token_id=tok.eos_token_id, **BASE,
                                  **FAMILIES[family])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    (root / "text.txt").write_text(TEXT * 40)
    write_classification_csv(root / "labels.csv", n_per_class=8)
    write_instruct_json(root / "instruct.json", n=12)
    assert main(["import-hf", str(root / "hf"), "--out", str(root / "base")]) == 0
    return family, root, root / "base"


def run(capsys, *args) -> str:
    """stdout of the verb, which must exit 0 with no traceback."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    return out


def hf_logits_equal_ours(ours_dir, export_dir) -> None:
    ours = load_checkpoint(ours_dir).model
    theirs = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=1e-4, rtol=0)


def test_info_generate_and_chat(imported, capsys):
    family, _, base = imported
    info = run(capsys, "info", "--checkpoint", base)
    assert f"{load_checkpoint(base).model.cfg.n_layers}" in info and "parameters" in info
    out = run(capsys, "generate", "--checkpoint", base, "--prompt", "Hello there", "--max-new-tokens", 5,
              "--temperature", 0)
    assert out.startswith("Hello there") and len(out) > len("Hello there")
    assert run(capsys, "chat", "--checkpoint", base, "--prompt", "How are you?", "--max-new-tokens", 5).endswith("\n")


def test_generate_and_serve_int8_decode_through_the_compiled_step(imported, monkeypatch, capsys):
    _, _, base = imported
    steps = []
    step = CompiledStep.__call__
    monkeypatch.setattr(CompiledStep, "__call__", lambda self, *a: steps.append(a[1].shape[0]) or step(self, *a))
    args = ("generate", "--checkpoint", base, "--prompt", "Hello there", "--max-new-tokens", 8, "--greedy",
            "--dtype", "int8")
    compiled = run(capsys, *args)
    assert len(steps) >= 1  # the one-token steps after the prompt ran in C (fewer if the model ends its text)
    monkeypatch.setattr(CompiledStep, "supports", staticmethod(lambda model: False))
    assert run(capsys, *args) == compiled  # the PyTorch modules on the same weights: the same greedy text
    monkeypatch.undo()

    served = []
    monkeypatch.setattr(serve_cli, "run_server", lambda *a, **kw: served.append(a))  # never listen in a test
    run(capsys, "serve", "--checkpoint", base, "--dtype", "int8")
    model, _, settings = served[0]
    assert isinstance(model.decode_step, CompiledStep) and settings.dtype == "int8"
    engine = Engine(model, max_batch=2, max_queue=4).start()
    try:  # two requests decoded in one batch, each row through its own experts: what each gets alone
        prompts, outs = [[1, 5, 9], [7, 2, 4, 4, 3, 8]], [[], []]
        done = [threading.Event() for _ in prompts]

        def collect(i):
            return lambda kind, payload: outs[i].append(payload.id) if kind == "token" else done[i].set()
        engine.submit([Sequence(p, 6, collect(i)) for i, p in enumerate(prompts)])
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
    model.decode_step = None  # the reference: the same weights through the PyTorch modules
    for p, out in zip(prompts, outs):
        assert out == generate(model, torch.tensor([p]), 6)[0, len(p):].tolist()


def test_eval_inspect_surprisal_and_doctor(imported, tmp_path, capsys):
    _, data, base = imported
    metrics = json.loads(run(capsys, "eval", "--checkpoint", base, "--data", data / "text.txt"))
    assert 1 < metrics["perplexity"] < 3 * load_checkpoint(base).model.cfg.vocab_size
    run(capsys, "inspect", "--checkpoint", base, "--prompt", "Hello there", "--out", tmp_path / "inspect")
    assert any((tmp_path / "inspect").iterdir())
    run(capsys, "surprisal", "--checkpoint", base, "--text", "Hello there, how are you?", "--out",
        tmp_path / "s.html")
    assert (tmp_path / "s.html").read_text().count("data-bits=") == len(load_checkpoint(base).tokenizer.encode(
        "Hello there, how are you?")) - 1  # every token but the first scored
    report = run(capsys, "doctor", "--checkpoint", base, "--data", data / "text.txt", "--lr", "1e-2")
    assert "FAIL" not in report and "KV cache" in report and "causal mask" in report


def test_train_init_from_continues_pretraining(imported, tmp_path, capsys):
    _, data, base = imported
    run(capsys, "train", "--data", data / "text.txt", "--init-from", base, "--steps", 4, "--batch-size", 2,
        "--eval-every", 4, "--out", tmp_path / "cont")
    before, after = load_checkpoint(base).model, load_checkpoint(tmp_path / "cont").model
    assert after.cfg == before.cfg and not torch.equal(after.tok_emb.weight, before.tok_emb.weight)
    run(capsys, "export-hf", "--checkpoint", tmp_path / "cont", "--out", tmp_path / "hf")
    hf_logits_equal_ours(tmp_path / "cont", tmp_path / "hf")


def test_finetune_classify_then_classify(imported, tmp_path, capsys):
    _, data, base = imported
    run(capsys, "finetune", "classify", "--init-from", base, "--data", data / "labels.csv", "--out", tmp_path / "cls",
        "--steps", 3, "--batch-size", 4, "--lora-rank", 2, "--lora-alpha", 4)
    row = json.loads(run(capsys, "classify", "--checkpoint", tmp_path / "cls", "--text", "the red is red"))
    assert row["label"] in ("animal", "colour", "fruit")
    run(capsys, "merge-lora", "--checkpoint", tmp_path / "cls", "--out", tmp_path / "merged")
    merged = json.loads(run(capsys, "classify", "--checkpoint", tmp_path / "merged", "--text", "the red is red"))
    assert merged["label"] == row["label"]
    assert merged["probabilities"] == pytest.approx(row["probabilities"], abs=1e-5)
    for checkpoint in ("cls", "merged"):  # a head over 3 labels is no causal language model: one line, exit 2
        assert main(["export-hf", "--checkpoint", str(tmp_path / checkpoint), "--out", str(tmp_path / "hf")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a classification fine-tune: its head scores 3 labels" in err
    assert not (tmp_path / "hf").exists()


def test_finetune_instruct_lora_merge_and_export(imported, tmp_path, capsys):
    family, data, base = imported
    run(capsys, "finetune", "instruct", "--init-from", base, "--data", data / "instruct.json", "--out",
        tmp_path / "ft", "--steps", 3, "--batch-size", 4, "--lr", "1e-2", "--lora-rank", 2, "--lora-alpha", 4)
    assert load_finetuned(tmp_path / "ft").meta["lora"]["targets"] == ["attn", "ff"]  # experts too, for a MoE
    assert run(capsys, "chat", "--checkpoint", tmp_path / "ft", "--prompt", "what is the word", "--max-new-tokens",
               4) is not None
    run(capsys, "merge-lora", "--checkpoint", tmp_path / "ft", "--out", tmp_path / "merged")
    adapted, merged = load_finetuned(tmp_path / "ft").model, load_checkpoint(tmp_path / "merged").model
    idx = torch.randint(0, merged.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), adapted(idx), atol=1e-5, rtol=0)
    run(capsys, "export-hf", "--checkpoint", tmp_path / "merged", "--out", tmp_path / "hf")
    hf_logits_equal_ours(tmp_path / "merged", tmp_path / "hf")
    run(capsys, "export-hf", "--checkpoint", tmp_path / "ft", "--out", tmp_path / "hf-direct")  # merged on the way
    hf_logits_equal_ours(tmp_path / "merged", tmp_path / "hf-direct")


@pytest.mark.slow
def test_torchrun_continues_pretraining_as_one_process_does(imported, tmp_path, capsys):
    """2 gloo processes (DDP; a mixture's experts that no token of a rank chose still get gradients)
    give the 1-process losses step for step."""
    _, data, base = imported
    common = ["--data", data / "text.txt", "--init-from", base, "--steps", 3, "--batch-size", 4, "--eval-every", 1,
              "--eval-batches", 1, "--lr-decay", "constant", "--warmup-steps", 0]
    run(capsys, "train", "--out", tmp_path / "one", *common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "build_llm.cli", "train", "--out", str(tmp_path / "two"), *map(str, common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [[json.loads(line) for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
            for run_dir in ("one", "two")]
    assert [r["step"] for r in rows[1]] == [1, 2, 3]
    for a, b in zip(*rows):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
