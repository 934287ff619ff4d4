"""`build-llm finetune classify|instruct`, `classify`, `merge-lora`, `export-hf` of a merge, and `chat`
(one answer with --prompt, streaming, and an interactive session through a pseudo-terminal)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from build_llm.store.checkpoint import load_checkpoint
from build_llm.cli import main
from build_llm.infer.chat import respond
from build_llm.infer.generate import generate
from build_llm.store.finetuned import load_finetuned

from tiny import write_classification_csv, write_instruct_json

pytestmark = pytest.mark.usefixtures("one_thread")


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_fine_tune_and_classify(base, tmp_path, capsys):
    data = tmp_path / "train.csv"
    write_classification_csv(data)
    code, out, err = run(["finetune", "classify", "--init-from", base, "--data", data, "--out", tmp_path / "run",
                          "--epochs", 4, "--lr", "3e-3", "--val-fraction", "0.25", "--seed", 1], capsys)
    assert code == 0, err
    summary = json.loads(out)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["val_accuracy"] == rows[-1]["val_accuracy"] >= 0.8
    assert "parameters trainable" in err

    code, out, err = run(["classify", "--checkpoint", tmp_path / "run", "--text", "the fox is fox", "--text",
                          "the pear is a pear"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in lines] == ["animal", "fruit"]
    assert set(lines[0]["probabilities"]) == {"animal", "colour", "fruit"}


def test_classify_fine_tune_can_train_every_weight(base, tmp_path, capsys):
    data = tmp_path / "train.csv"
    write_classification_csv(data)
    code, out, err = run(["finetune", "classify", "--init-from", base, "--data", data, "--out", tmp_path / "run",
                          "--steps", 2, "--trainable", "all"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["trainable_parameters"] == summary["parameters"]
    before = load_checkpoint(base).model.state_dict()
    after = load_finetuned(tmp_path / "run").model.state_dict()
    first_block = [k for k in before if k.startswith("trf_blocks.0.") and k.endswith("weight")]
    assert first_block and all(not torch.equal(after[k], before[k]) for k in first_block)  # the book's recipe freezes them


def test_lora_instruct_merge_and_export_hf(base, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    data = tmp_path / "train.json"
    write_instruct_json(data, 24)
    code, out, err = run(["finetune", "instruct", "--init-from", base, "--data", data, "--out", tmp_path / "lora",
                          "--steps", 3, "--lr", "1e-2", "--lora-rank", 4, "--lora-alpha", 8, "--lora-targets",
                          "attn,ff"], capsys)
    assert code == 0, err
    # rank 4 on the attention and MLP of 2 blocks, and the end token's row (emb_dim; the head is tied)
    assert json.loads(out)["trainable_parameters"] == 2 * 4 * (4 * 64 + 2 * 160) + 64
    assert run(["merge-lora", "--checkpoint", tmp_path / "lora", "--out", tmp_path / "merged"], capsys)[0] == 0
    code, _, err = run(["export-hf", "--checkpoint", tmp_path / "merged", "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    adapted = load_finetuned(tmp_path / "lora")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    x[0, 7] = adapted.tokenizer.eos_id  # its trained row is read as well as predicted
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, adapted.model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra, message", [
    (["--text-column", "body"], "--text-column 'body' is not a column"),
    (["--lora-rank", "4"], "--lora-rank and --lora-alpha go together; give both (alpha is often twice the rank)"),
    (["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "mlp"], "--lora-targets"),
    (["--resume"], "--resume: no checkpoint"),
    (["--micro-batch-size", "3"], "does not divide"),
    (["--trainable", "all", "--lora-rank", "4", "--lora-alpha", "8"], "--trainable='all' applies to"),
    (["--trainable", "head"], "--trainable: invalid choice: 'head'"),
])
def test_bad_input_is_one_line_and_exit_2(base, tmp_path, capsys, extra, message):
    data = tmp_path / "train.csv"
    write_classification_csv(data, 2)
    code, out, err = run(["finetune", "classify", "--init-from", base, "--data", data, "--out", tmp_path / "run",
                          *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and out == ""


@pytest.mark.parametrize("task", ["classify", "instruct"])
@pytest.mark.parametrize("flag", ["--data", "--val-data"])
def test_a_device_as_data_is_refused_before_it_is_read(base, tmp_path, capsys, task, flag):
    data = tmp_path / "train.csv"
    write_classification_csv(data, 2)
    paths = {"--data": data, "--val-data": data, flag: "/dev/zero"}  # /dev/zero never ends
    code, out, err = run(["finetune", task, "--init-from", base, "--data", paths["--data"], "--val-data",
                          paths["--val-data"], "--out", tmp_path / "run"], capsys)
    assert code == 2 and f"{flag} '/dev/zero' is not a regular file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_foreign_out_directory_is_refused_and_left_alone(base, tmp_path, capsys):
    data = tmp_path / "train.json"
    write_instruct_json(data, 8)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = run(["finetune", "instruct", "--init-from", base, "--data", data, "--out", mine], capsys)
    assert code == 2 and "did not create" in err
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_instruct_needs_an_end_token(tmp_path, capsys):
    from build_llm import CharTokenizer, GPTModel
    from build_llm.store.checkpoint import save_checkpoint

    from tiny import tiny_cfg

    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz #:\n.,'")
    save_checkpoint(tmp_path / "char", GPTModel(tiny_cfg(tok.vocab_size)), tok)
    data = tmp_path / "train.json"
    write_instruct_json(data, 8)
    code, _, err = run(["finetune", "instruct", "--init-from", tmp_path / "char", "--data", data, "--out",
                        tmp_path / "run"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "character tokenizer" in err and "no end token" in err and "without --tokenizer char" in err
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.fixture(scope="module")
def instruct_run(base, tmp_path_factory):
    from build_llm.train.finetune import finetune
    from build_llm.train.config import FinetuneConfig

    tmp = tmp_path_factory.mktemp("instruct")
    write_instruct_json(tmp / "train.json", 16)
    finetune(tmp / "run", base, FinetuneConfig(task="instruct", steps=2, lr=1e-3), data=tmp / "train.json",
             log=lambda s: None)
    return tmp / "run"


def test_chat_prompt_prints_the_reply(instruct_run, capsys):
    code, out, err = run(["chat", "--checkpoint", instruct_run, "--prompt", "what is the word", "--max-new-tokens",
                          8], capsys)
    assert code == 0, err
    ft = load_finetuned(instruct_run)
    assert out == respond(ft.model, ft.tokenizer, [{"role": "user", "content": "what is the word"}], 8) + "\n"


def test_chat_replies_with_what_the_context_leaves_by_default(instruct_run, capsys):
    """A message longer than half the 96-token context is answered (the reply may take what is left);
    an explicit --max-new-tokens that leaves the message no room keeps its clear error."""
    from build_llm.data.instruct import encode_conversation

    ft = load_finetuned(instruct_run)
    message = "what is the word"  # 75 tokens in the Alpaca prompt
    ids, _ = encode_conversation([{"role": "user", "content": message}], ft.tokenizer, ft.tokenizer.eos_id,
                                 add_generation_prompt=True)
    context = ft.model.cfg.context_length
    assert context // 2 < len(ids) < context  # refused before: the reply kept half the context
    code, out, err = run(["chat", "--checkpoint", instruct_run, "--prompt", message, "--temperature", 0], capsys)
    assert code == 0, err
    with torch.no_grad():  # the greedy reply, by the library's own loop, up to the end token or the context's end
        reply = generate(ft.model, torch.tensor([ids]), context - len(ids), eos_id=ft.tokenizer.eos_id)[0, len(ids):]
    reply = reply.tolist()
    reply = reply[:reply.index(ft.tokenizer.eos_id)] if ft.tokenizer.eos_id in reply else reply
    assert out == ft.tokenizer.decode(reply) + "\n"
    code, out, err = run(["chat", "--checkpoint", instruct_run, "--prompt", message, "--max-new-tokens",
                          context - len(ids) + 1], capsys)
    assert code == 2 and "context window leaves" in err and len(err.strip().splitlines()) == 1


class Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_chat_streams_pieces_as_they_are_generated(instruct_run):
    from build_llm.infer.chat import run_chat

    out = Recorder()
    run_chat(str(instruct_run), prompt="what colour", max_new_tokens=6, stdout=out, stderr=io.StringIO())
    reply = out.getvalue().rstrip("\n")
    steps = [s for s in out.flushed if s]
    assert len(steps) >= 2 and steps[-1] == reply  # shown piece by piece, each piece flushed
    assert all(reply.startswith(s) for s in steps)


def _read_until(fd: int, marker: str, seen: str, timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {marker!r}; got {seen[-500:]!r}")
        try:
            seen += os.read(fd, 4096).decode("utf-8", "replace")
        except OSError:  # the child closed the terminal
            raise AssertionError(f"terminal closed before {marker!r}; got {seen[-500:]!r}") from None
    return seen


def test_interactive_chat_through_a_pseudo_terminal(instruct_run):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "build_llm.cli", "chat", "--checkpoint", str(instruct_run),
                             "--max-new-tokens", "16", "--system", "Answer."], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    try:
        seen = _read_until(master, "you> ", "")
        assert "/reset" in seen and "96-token context" in seen
        os.write(master, b"what is the word\n")
        seen = _read_until(master, "you> ", seen.split("you> ", 1)[1])
        assert "bot> " in seen and "dropped" not in seen
        # A long message: the window (96 tokens, 16 kept for the reply) cannot also hold the first turn.
        os.write(master, b"what is the word red green blue apple pear plum cat dog fox\n")
        seen = _read_until(master, "you> ", seen.split("you> ", 1)[1])
        assert "dropped the 1 oldest turn(s)" in seen
        os.write(master, b"/temperature 0.5\n")
        seen = _read_until(master, "(temperature 0.5)", seen)
        os.write(master, b"/reset\n")
        seen = _read_until(master, "(conversation cleared)", seen)
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def _trained_here(base, tmp_path):
    """A copy of the tiny base with a training record, as `build-llm train` leaves one."""
    import shutil

    from build_llm.store.checkpoint import TRAINER_FILE

    path = tmp_path / "trained"
    shutil.copytree(base, path)
    (path / TRAINER_FILE).write_text(json.dumps({"format": 1, "step": 10, "train_config": {"lr": 4e-3}}))
    return path


@pytest.mark.parametrize("trained_here, lr, trainable, words", [
    (False, 5e-5, "last-block", "book's recipe"), (True, 2e-3, "all", "small base trained here at lr 0.004")])
def test_defaults_are_chosen_by_the_base_and_said(base, tmp_path, capsys, trained_here, lr, trainable, words):
    data = tmp_path / "train.csv"
    write_classification_csv(data)
    init = _trained_here(base, tmp_path) if trained_here else base
    code, out, err = run(["finetune", "classify", "--init-from", init, "--data", data, "--out", tmp_path / "run",
                          "--steps", 1], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["finetune_config"]
    assert (saved["lr"], saved["trainable"]) == (lr, trainable)
    recipe = next(line for line in err.splitlines() if line.startswith("fine-tuning recipe:"))
    assert f"lr {lr:g}" in recipe and words in recipe, recipe
    summary = json.loads(out)
    assert (summary["trainable_parameters"] == summary["parameters"]) == (trainable == "all")


def test_given_settings_win_over_the_base_s(base, tmp_path, capsys):
    data = tmp_path / "train.csv"
    write_classification_csv(data)
    code, _, err = run(["finetune", "classify", "--init-from", _trained_here(base, tmp_path), "--data", data,
                        "--out", tmp_path / "run", "--steps", 1, "--lr", "1e-3", "--trainable", "last-block"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["finetune_config"]
    assert (saved["lr"], saved["trainable"]) == (1e-3, "last-block") and "given by --lr and --trainable" in err


def _records(path, outputs):
    path.write_text(json.dumps([{"instruction": "what is the word", "input": "fox", "output": o} for o in outputs]))


def test_no_example_fits_stops_with_exit_2(base, tmp_path, capsys):
    """The tiny base's context is 96 tokens: every response here is far longer."""
    data = tmp_path / "long.json"
    _records(data, [" ".join(["red green blue apple"] * (40 + i)) for i in range(10)])
    code, out, err = run(["finetune", "instruct", "--init-from", base, "--data", data, "--out", tmp_path / "run"],
                         capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "no training example fits in 96 tokens" in err and "--context-length" in err
    from build_llm.data.instruct import encode_conversation, read_instruction_data
    from build_llm.train.finetune import split_indices

    tok, conversations = load_checkpoint(base).tokenizer, read_instruction_data(data)[0]
    train_idx, _ = split_indices(len(conversations), 0.1, 123)  # the default split and seed
    lengths = sorted(len(encode_conversation(conversations[i], tok, tok.eos_id)[0]) - 1 for i in train_idx)
    assert f"they are {lengths[0]} to {lengths[-1]} tokens long" in err  # the shortest and the longest
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_examples_that_do_not_fit_are_counted_before_the_first_step(base, tmp_path, capsys):
    data = tmp_path / "mixed.json"
    _records(data, ["animal"] * 16 + [" ".join(["red green blue apple"] * 40)] * 4)
    code, _, err = run(["finetune", "instruct", "--init-from", base, "--data", data, "--val-fraction", "0.2",
                        "--out", tmp_path / "run", "--steps", 1, "--lr", "1e-3"], capsys)
    assert code == 0, err
    lines = err.splitlines()
    note = next(i for i, line in enumerate(lines) if "are left out" in line)
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert note < first_step
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["data"]
    assert state["n_dropped"] + state["n_val_dropped"] == 4 and state["n_train"] + state["n_val"] == 16
    assert f"{state['n_dropped']} training and {state['n_val_dropped']} validation" in lines[note]


def test_the_help_says_lora_rank_needs_lora_alpha(capsys):
    # A newcomer giving --lora-rank alone was refused by a rule the help did not state ("default: none").
    with pytest.raises(SystemExit):
        main(["finetune", "instruct", "--help"])
    assert "--lora-rank needs it, e.g. twice the rank" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("steps", [2, 1])
def test_resume_to_a_step_the_run_has_passed_is_refused_as_train_refuses_it(base, tmp_path, capsys, steps):
    # It printed the last row and exited 0, having trained nothing.
    data = tmp_path / "train.csv"
    write_classification_csv(data, 2)
    argv = ["finetune", "classify", "--init-from", base, "--data", data, "--out", tmp_path / "run"]
    assert run([*argv, "--steps", 2], capsys)[0] == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    code, out, err = run([*argv, "--resume", "--steps", steps], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "--resume: the run in" in err and "is already at step 2; give --steps above 2" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
