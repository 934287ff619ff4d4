"""`build-llm import-hf` and `build-llm export-hf` end to end, and their bad-input paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from build_llm import CharTokenizer, GPT2Tokenizer, GPTConfig, GPTModel, load_checkpoint, save_checkpoint
from build_llm.cli import main

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

# GPT-2's own vocabulary, so the imported checkpoint carries the GPT-2 tokenizer and can generate text.
SMALL = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SMALL)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(hf_dir):
    return GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def checkpoint(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "imported"
    assert main(["import-hf", str(hf_dir), "--out", str(out)]) == 0
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_import_hf_writes_a_checkpoint_with_the_same_logits(checkpoint, reference):
    ckpt = load_checkpoint(checkpoint)
    assert isinstance(ckpt.tokenizer, GPT2Tokenizer)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(idx), reference(idx).logits, atol=1e-5, rtol=0)


def test_generate_from_an_imported_checkpoint_matches_hugging_face(checkpoint, reference, capsys):
    prompt = "Every effort moves you"
    code, out, err = run(capsys, "generate", "--checkpoint", checkpoint, "--prompt", prompt, "--max-new-tokens", 15,
                         "--temperature", 0)
    assert code == 0, err
    tok = GPT2Tokenizer()
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15,
                                      do_sample=False, pad_token_id=50256, eos_token_id=None)
    assert out == tok.decode(expected[0].tolist()) + "\n"


def test_export_hf_round_trip(checkpoint, reference, tmp_path, capsys):
    out_dir = tmp_path / "exported"
    code, out, err = run(capsys, "export-hf", "--checkpoint", checkpoint, "--out", out_dir)
    assert code == 0, err
    assert out.strip() == f"{out_dir}: config.json, merges.txt, model.safetensors, tokenizer_config.json, vocab.json"
    loaded = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    idx = torch.randint(0, 50257, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, reference(idx).logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out_dir)("Olá, mundo")["input_ids"] == GPT2Tokenizer().encode("Olá, mundo")
    code, out, err = run(capsys, "export-hf", "--checkpoint", checkpoint, "--out", tmp_path / "bare", "--no-tokenizer")
    assert code == 0 and sorted(p.name for p in (tmp_path / "bare").iterdir()) == [
        ".build-llm", "config.json", "model.safetensors"]


def test_export_hf_of_a_char_checkpoint_notes_the_tokenizer_is_left_out(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", GPTModel(GPTConfig.from_preset("r-abc")), CharTokenizer.from_text("ABC\n"))
    code, out, err = run(capsys, "export-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert code == 0
    assert "CharTokenizer has no Hugging Face form" in err
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "hf").config.vocab_size == 5


def test_import_hf_tokenizer_choices(hf_dir, tmp_path, capsys):
    code, _, err = run(capsys, "import-hf", hf_dir, "--out", tmp_path / "none", "--tokenizer", "none")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "none").tokenizer is None
    (tmp_path / "tok.json").write_text(json.dumps({"type": "gpt2"}))
    code, _, err = run(capsys, "import-hf", hf_dir, "--out", tmp_path / "file", "--tokenizer", tmp_path / "tok.json")
    assert code == 0, err
    assert isinstance(load_checkpoint(tmp_path / "file").tokenizer, GPT2Tokenizer)


def bad_dirs(root, hf_dir):
    """Directories that import-hf must refuse, each with the words its error should contain."""
    (root / "empty").mkdir()
    cases = {"missing": (root / "missing", "does not exist"), "empty": (root / "empty", "has no config.json")}
    config = json.loads((hf_dir / "config.json").read_text())
    for name, change, words in [("cross", {"add_cross_attention": True}, "add_cross_attention=True is not supported"),
                                ("relu", {"activation_function": "relu"}, "activation_function='relu'")]:
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
        (root / name / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
        cases[name] = (root / name, words)
    (root / "truncated").mkdir()
    (root / "truncated" / "config.json").write_text(json.dumps(config))
    weights = (hf_dir / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    cases["truncated"] = (root / "truncated", "unreadable or truncated")
    return cases


def test_import_hf_bad_input_is_one_line_and_writes_nothing(hf_dir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for name, (path, words) in bad_dirs(tmp_path / "in", hf_dir).items():
        out = tmp_path / f"out-{name}"
        code, stdout, err = run(capsys, "import-hf", path, "--out", out)
        assert code == 2, name
        assert stdout == "" and err.count("\n") == 1 and words in err, (name, err)
        assert not out.exists(), name


def test_import_hf_refuses_to_overwrite_what_is_not_a_checkpoint(hf_dir, tmp_path, capsys):
    before = sorted(p.name for p in hf_dir.iterdir())
    for out in (hf_dir, hf_dir.parent):  # the directory, or a folder holding it (fsio.check_not_input's rule)
        code, _, err = run(capsys, "import-hf", hf_dir, "--out", out)
        assert code == 2 and f"is also the input DIR {str(hf_dir)!r}" in err, err
    assert sorted(p.name for p in hf_dir.iterdir()) == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    code, _, err = run(capsys, "import-hf", hf_dir, "--out", tmp_path / "notes")
    assert code == 2 and "non-empty directory that build-llm did not create" in err
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "import-hf", hf_dir, "--out", tmp_path / "file")
    assert code == 2 and "is a file" in err and (tmp_path / "file").read_text() == "x"
    code, _, err = run(capsys, "import-hf", hf_dir, "--out", tmp_path / "x", "--tokenizer", "bogus")
    assert code == 2 and "--tokenizer 'bogus' is invalid; expected gpt2, none or a tokenizer JSON file" in err


def test_import_hf_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(**{**SMALL, "vocab_size": 1000})).save_pretrained(tmp_path / "hf")
    code, _, err = run(capsys, "import-hf", tmp_path / "hf", "--out", tmp_path / "ckpt")
    assert code == 2 and "has 50257 ids but the model's vocabulary has 1000" in err
    assert not (tmp_path / "ckpt").exists()


def test_export_hf_bad_input(checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, "export-hf", "--checkpoint", tmp_path / "nothing", "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in err and not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "export-hf", "--checkpoint", checkpoint, "--out", tmp_path / "file")
    assert code == 2 and "is a file" in err
    before = sorted(p.name for p in checkpoint.iterdir())
    code, _, err = run(capsys, "export-hf", "--checkpoint", checkpoint, "--out", checkpoint)
    assert code == 2 and "is a build-llm checkpoint directory, not an hf-export directory" in err  # "a hf-export" before
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_the_command_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "build_llm.cli", "import-hf", str(tmp_path), "--out",
                             str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (f"build-llm: error: {str(tmp_path)!r} has no config.json; a Hugging Face "
                                     "GPT-2 directory holds config.json plus model.safetensors or pytorch_model.bin")


def test_export_hf_of_an_instruction_fine_tune_carries_its_chat_format(tmp_path, capsys):
    # The export had no chat template: transformers' apply_chat_template failed, and import-hf read it back as
    # a model that is not instruction-tuned. Now transformers prompts it with the ids it was fine-tuned on.
    from build_llm.data.chat_template import chat_format
    from build_llm.store.finetuned import load_finetuned
    from tiny import tiny_cfg, words_tokenizer, write_instruct_json

    tok = words_tokenizer()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", GPTModel(tiny_cfg(tok.vocab_size)), tok)
    write_instruct_json(tmp_path / "train.json", 24)
    assert run(capsys, "finetune", "instruct", "--init-from", tmp_path / "base", "--data", tmp_path / "train.json",
               "--out", tmp_path / "sft", "--steps", "1")[0] == 0
    for name in ("sft", "base"):
        assert run(capsys, "export-hf", "--checkpoint", tmp_path / name, "--out", tmp_path / f"{name}-hf")[0] == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "base-hf").chat_template is None  # not instruction-tuned
    hf, ours = AutoTokenizer.from_pretrained(tmp_path / "sft-hf"), chat_format(load_finetuned(tmp_path / "sft").tokenizer)
    user, reply = {"role": "user", "content": "what is the word\n\n### Input:\nfox"}, {"role": "assistant", "content": "animal"}
    for messages, prompt in (([{"role": "system", "content": "Be brief."}, user], True),
                             ([user, reply, {"role": "user", "content": "and the cat"}], True),
                             ([user, reply], False)):  # the text a training example is
        ids = hf.apply_chat_template(messages, add_generation_prompt=prompt)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == ours.encode(messages, add_generation_prompt=prompt)[0]
