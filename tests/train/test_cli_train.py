"""The `train` and `eval` verbs end to end: bad input (one line, exit 2, nothing damaged), eval JSON,
generate on a trained checkpoint, Ctrl-C, and torchrun with 2 CPU processes against 1 process."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from build_llm.store.checkpoint import load_trainer_state
from build_llm.cli import main

TINY = ["--context-length", "8", "--emb-dim", "32", "--n-layers", "1", "--n-heads", "2"]
SMALL_RUN = [*TINY, "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def abc_run(tmp_path_factory) -> tuple[Path, str]:
    """A 4-step ABC run made through the CLI (and its stdout), shared by the tests that read or resume it."""
    import contextlib
    import io

    run = tmp_path_factory.mktemp("abc") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--abc", "--out", str(run), *SMALL_RUN]) == 0
    return run, out.getvalue()


def test_abc_run_prints_loss_beside_optimum_and_samples(abc_run):
    run, out = abc_run
    assert "validation loss" in out and "exact optimum   0.370651" in out  # optimal_loss(ABC, 8)
    assert "Greedy from 'A':\nA" in out and "Top-k 2 from 'A':\nA" in out
    greedy = out.split("Greedy from 'A':\n")[1].split("\n\nTop-k")[0]
    # 700 new tokens; an untrained model may emit <PAD>, which decodes to nothing
    assert 100 < len(greedy) <= 701 and set(greedy) <= set("ABC\n")
    assert [r["step"] for r in rows(run)] == [2, 4]
    assert (run / "loss.png").is_file()


def test_eval_json(abc_run, capsys, tmp_path):
    abc_run = abc_run[0]
    code, out, _ = cli(capsys, "eval", "--checkpoint", abc_run)
    result = json.loads(out)
    assert code == 0 and set(result) >= {"loss", "perplexity", "tokens", "optimal_loss", "excess"}
    assert abs(result["excess"] - (result["loss"] - result["optimal_loss"])) < 1e-12
    assert 0.3 < result["optimal_loss"] < 0.45  # the window optimum for context 8 is near 0.3707
    text = tmp_path / "abc.txt"
    text.write_text("AABCBBCBCABCCA" * 20, encoding="utf-8")
    code, out, _ = cli(capsys, "eval", "--checkpoint", abc_run, "--data", text)
    result = json.loads(out)
    assert code == 0 and result["tokens"] == (len("AABCBBCBCABCCA" * 20) - 1) // 8 * 8 and "optimal_loss" in result
    # one character (one byte) per token: bits per character is the loss in bits
    assert result["characters"] == result["bytes"] == result["tokens"]
    assert abs(result["bits_per_char"] - result["loss"] / math.log(2)) < 1e-12 and result["bits_per_byte"] == result["bits_per_char"]


def test_generate_on_a_trained_checkpoint(abc_run, capsys):
    abc_run = abc_run[0]
    code, out, _ = cli(capsys, "generate", "--checkpoint", abc_run, "--prompt", "AB", "--max-new-tokens", "20")
    assert code == 0 and out.startswith("AB") and len(out.rstrip("\n")) >= 2
    code, _, err = cli(capsys, "generate", "--checkpoint", abc_run, "--prompt", "ABz")
    assert code == 2 and "not in the vocabulary" in err and err.count("\n") == 1


def bad(tmp_path: Path, name: str, content: bytes | None) -> Path:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("argv, message", [
    (lambda t: ["--data", bad(t, "missing.txt", None)], "does not exist"),
    (lambda t: ["--data", bad(t, "empty.txt", b"")], "empty"),
    (lambda t: ["--data", bad(t, "bin.txt", b"\x00\x01\x02abc")], "binary"),
    (lambda t: ["--data", bad(t, "latin.txt", "olá".encode("latin-1"))], "not valid UTF-8"),
    (lambda t: ["--data", bad(t, "short.txt", b"hello world")], "corpus too short"),
    (lambda t: ["--data", bad(t, "ok.txt", b"x" * 500), "--tokenizer", t / "none.json"],
     "is neither bpe, char, gpt2 nor an existing tokenizer JSON"),
    (lambda t: ["--data", bad(t, "ok.txt", b"x" * 500), "--tokenizer", bad(t, "tok.json", b"{oops")], "does not parse"),
    (lambda t: ["--n-heads", "3"], "not divisible by --n-heads=3"),
    (lambda t: ["--drop-rate", "1.5"], "--drop-rate=1.5"),
    (lambda t: ["--lr", "-1"], "--lr=-1"),
    (lambda t: ["--betas", "0.9"], "not two comma-separated numbers"),
    (lambda t: ["--batch-size", "0"], "expected an integer >= 1"),
    (lambda t: ["--resume"], "no checkpoint in"),
    (lambda t: ["--fsdp"], "--fsdp needs several processes"),
    (lambda t: ["--pos-emb", "rope", "--emb-dim", "30", "--n-heads", "10"], "--pos-emb='rope' needs an even head size"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    code, out, err = cli(capsys, "train", "--out", tmp_path / "run", *TINY, *argv(tmp_path))
    assert code == 2 and message in err and err.count("\n") == 1 and out == "", err


@pytest.mark.parametrize("argv, message", [
    (["--data", "ok.txt", "--tokenizer", "gtp2"], "--tokenizer 'gtp2' is neither bpe, char, gpt2 nor an existing"),
    (["--tokenizer", "bpe"], "--tokenizer bpe is trained on --data; the ABC experiment takes char, gpt2"),
])
def test_a_tokenizer_that_is_no_choice_is_named_as_the_flag_before_the_run_is_made(tmp_path, capsys, argv, message):
    # It said "name_or_path='gtp2' is neither a tokenizer name ('gpt2', 'char')": the code's name, without bpe.
    bad(tmp_path, "ok.txt", b"x" * 500)
    code, out, err = cli(capsys, "train", "--out", tmp_path / "run", *TINY,
                         *[str(tmp_path / a) if a == "ok.txt" else a for a in argv])
    assert code == 2 and message in err and err.count("\n") == 1 and out == "", err
    assert not (tmp_path / "run").exists()


def test_eval_of_a_model_trained_on_a_text_needs_data_not_the_abc_default(tmp_path, capsys):
    # Without --data it scored the ABC source and exited 0: bits per character and an "excess" over the ABC
    # optimum that say nothing of a model of one's own text.
    run = tmp_path / "run"
    assert cli(capsys, "train", "--data", abc_file(tmp_path, 400), "--tokenizer", "char", "--out", run, *SMALL_RUN)[0] == 0
    code, out, err = cli(capsys, "eval", "--checkpoint", run)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "give --data (a held-out text)" in err and "was not trained on the ABC source" in err
    code, out, err = cli(capsys, "eval", "--checkpoint", run, "--abc")  # asked for: scored, with the optimum
    assert code == 0 and "optimal_loss" in json.loads(out), err


def test_out_is_a_file_or_an_existing_run(tmp_path, capsys, abc_run):
    abc_run = abc_run[0]
    f = tmp_path / "file"
    f.write_text("keep me")
    code, _, err = cli(capsys, "train", "--out", f, *SMALL_RUN)
    assert code == 2 and "is a file" in err and f.read_text() == "keep me"
    before = (abc_run / "checkpoint" / "model.safetensors").read_bytes()
    code, _, err = cli(capsys, "train", "--out", abc_run, *SMALL_RUN)
    assert code == 2 and "already holds a run" in err
    assert (abc_run / "checkpoint" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["--n-layers", "2"], "n_layers=2 contradicts"),
    (["--lr", "0.5"], "lr=0.5 contradicts"),
    (["--preset", "r-abc"], "--preset r-abc contradicts"),
    (["--data", "README.md"], "drop --data"),
    (["--tokenizer", "gpt2"], "tokenizer differs"),
])
def test_resume_with_contradicting_settings(abc_run, capsys, argv, message):
    abc_run = abc_run[0]
    before = (abc_run / "checkpoint" / "model.safetensors").read_bytes()
    code, _, err = cli(capsys, "train", "--out", abc_run, "--resume", "--steps", "6", *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert (abc_run / "checkpoint" / "model.safetensors").read_bytes() == before


def test_eval_bad_checkpoint(tmp_path, capsys, abc_run):
    abc_run = abc_run[0]
    code, _, err = cli(capsys, "eval", "--checkpoint", tmp_path / "nothing")
    assert code == 2 and "does not exist" in err
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(abc_run / "checkpoint", broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    code, _, err = cli(capsys, "eval", "--checkpoint", broken)
    assert code == 2 and "unreadable or truncated" in err


def abc_file(tmp_path: Path, words: int = 4000) -> Path:
    """ABC text as a file: the ABC task without the demo's 700-character samples at the end."""
    from build_llm.data.markov import abc_text

    path = tmp_path / "abc.txt"
    path.write_text(abc_text(words, seed=1), encoding="utf-8")
    return path


def test_ctrl_c_saves_exits_130_and_resumes(tmp_path):
    run, data = tmp_path / "run", abc_file(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "build_llm.cli", "train", "--data", str(data), "--out", str(run), *TINY,
                             "--steps", "100000", "--eval-every", "20", "--eval-batches", "1", "--batch-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 60
    while not (run / "checkpoint").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "continue: the same command with --resume" in err and "Traceback" not in err
    step = load_trainer_state(run).state["step"]
    assert step >= 20 and step >= rows(run)[-1]["step"]  # saved where it stopped, not only at evaluations
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--steps", str(step + 3)]) == 0
    assert load_trainer_state(run).state["step"] == step + 3


def torchrun(*argv, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "build_llm.cli", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def test_two_processes_reproduce_one_with_resume_and_fsdp(tmp_path, capsys):
    """ABC, dropout 0: 2 gloo processes (4 steps with DDP, then resumed to 8 with FSDP) give the 1-process
    losses step for step; metrics and checkpoint are written once, by rank 0."""
    common = ["--data", abc_file(tmp_path), *TINY, "--drop-rate", "0", "--batch-size", "8", "--grad-accum", "2", "--eval-every", "1",
              "--eval-batches", "2", "--lr-decay", "constant", "--warmup-steps", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--out", str(one), "--steps", "8", *map(str, common)]) == 0
    out1 = capsys.readouterr().out
    first = torchrun("train", "--out", two, "--steps", "4", *common)
    assert first.returncode == 0, first.stderr[-2000:]
    assert load_trainer_state(two).state["world_size"] == 2
    second = torchrun("train", "--out", two, "--steps", "8", "--resume", "--fsdp", *common)
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = rows(one), rows(two)
    assert [r["step"] for r in b] == list(range(1, 9))  # one row per step: only rank 0 wrote
    diff = max(max(abs(x["train_loss"] - y["train_loss"]), abs(x["val_loss"] - y["val_loss"])) for x, y in zip(a, b))
    print(f"max |loss(1 process) - loss(2 processes)| = {diff:.3g}")
    assert diff < 1e-5
    assert second.stdout.count("validation loss") == 1 and out1.count("validation loss") == 1
    assert not [p for p in two.iterdir() if p.name.startswith(".checkpoint")]  # no leftover temporary dirs
    assert load_trainer_state(two).state["step"] == 8


@pytest.mark.slow
def test_demo_ends_within_001_of_the_optimum(tmp_path):
    """The full `make demo` run: 800 steps of the R notebook's experiment end within 0.01 nats of the
    exact optimum on the whole validation split."""
    proc = subprocess.run([sys.executable, "-m", "build_llm.cli", "train", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("validation loss"))
    val = float(line.split()[2])
    assert abs(val - 0.258584) < 0.01, proc.stdout[:500]


def test_train_with_architecture_options_then_export_to_llama(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--data", text, "--out", run, *SMALL_RUN, "--drop-rate", "0", "--pos-emb", "rope",
                       "--norm", "rmsnorm", "--mlp", "swiglu", "--no-bias", "--no-qkv-bias", "--ff-dim", "40")
    assert code == 0, err
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert (config["pos_emb"], config["norm"], config["mlp"], config["bias"], config["ff_dim"]) == ("rope", "rmsnorm", "swiglu", False, 40)
    code, _, err = cli(capsys, "export-hf", "--checkpoint", run, "--out", tmp_path / "hf")
    assert code == 0, err
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.intermediate_size == 40


def greek_text(tmp_path: Path, lines: int = 900) -> Path:
    """A corpus with a non-ASCII alphabet (Greek words and Portuguese accents), made here."""
    import random

    rng = random.Random(0)
    words = "λόγος ψυχή θάλασσα ἥλιος νύξ ação coração não órgão água".split()
    path = tmp_path / "greek.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(lines)) + "\n",
                    encoding="utf-8")
    return path


def test_data_default_is_a_bpe_model_that_can_chat_and_says_what_next(tmp_path, capsys):
    """No tokenizer or shape flag: a byte-level BPE with an end token, saved in the run, and a context
    of 256; the run ends saying where its checkpoint is and the commands that use it."""
    from build_llm.data.tokenizer import BPETokenizer
    from build_llm.store.checkpoint import load_checkpoint

    data, run = greek_text(tmp_path), tmp_path / "my run"
    code, out, err = cli(capsys, "train", "--data", data, "--out", run, "--steps", "2", "--batch-size", "2",
                         "--eval-every", "2", "--eval-batches", "1")
    assert code == 0, err
    ckpt = load_checkpoint(run)
    assert isinstance(ckpt.tokenizer, BPETokenizer) and ckpt.tokenizer.eos_id is not None
    assert ckpt.model.cfg.context_length == 256 and ckpt.model.cfg.vocab_size == ckpt.tokenizer.vocab_size
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("ἥλιος? 日本語 ✓")) == "ἥλιος? 日本語 ✓"  # any text
    assert "plan: validation: the last 10% of each file" in err
    assert f"checkpoint: {run / 'checkpoint'}" in out
    assert f"build-llm generate --checkpoint '{run}' --prompt" in out
    assert f"build-llm finetune instruct --init-from '{run}'" in out and f"build-llm chat --checkpoint '{run}-sft'" in out


def test_tokenizer_char_keeps_the_character_model(tmp_path, capsys):
    data, run = greek_text(tmp_path), tmp_path / "run"
    code, out, err = cli(capsys, "train", "--data", data, "--tokenizer", "char", "--out", run, "--steps", "2",
                         "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1")
    assert code == 0, err
    from build_llm.data.tokenizer import CharTokenizer
    from build_llm.store.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run)
    assert isinstance(ckpt.tokenizer, CharTokenizer) and ckpt.model.cfg.context_length == 64
    assert set(ckpt.tokenizer.vocab[1:]) == set(data.read_text(encoding="utf-8"))
    assert "finetune classify" in out and "finetune instruct" not in out  # no end token: it cannot instruct


def test_train_help_names_the_shapes_it_chooses(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "6-layer 384-wide char model" not in help_text
    assert "bpe (the default for --data" in help_text and "context 256 (64 for --tokenizer char)" in help_text


def test_time_budget_under_torchrun_plans_once_for_both_processes(tmp_path):
    """2 gloo processes with --time-budget and no shape: the main process's plan (shape and steps,
    throughput of both processes together) is both processes', so DDP wraps one model; the run keeps
    to its budget. With an explicit shape and --steps the plan's time line is a real estimate."""
    data, run, budget = abc_file(tmp_path, words=20000), tmp_path / "run", 20
    start = time.perf_counter()
    proc = torchrun("train", "--data", data, "--time-budget", f"{budget}s", "--out", run)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"torchrun --time-budget {budget}s took {wall:.1f} s")
    assert proc.stderr.count("plan: time budget") == 1 and "2 processes together" in proc.stderr
    probes = [line for line in proc.stderr.splitlines() if line.startswith("probe:")]
    assert probes and all(float(p.split(": ")[2].split()[0].replace(",", "")) > 0 for p in probes)
    state = load_trainer_state(run).state
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert state["world_size"] == 2 and state["step"] == state["train_config"]["steps"] == rows(run)[-1]["step"]
    assert (config["n_layers"], config["emb_dim"]) in {(2, 64), (3, 96), (4, 128), (4, 192), (6, 256)}
    assert state["elapsed_s"] < budget  # the Deadline (rank 0's, on both processes) ended training in time

    fixed = torchrun("train", "--data", data, "--out", tmp_path / "fixed", *SMALL_RUN)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    line = next(l for l in fixed.stderr.splitlines() if l.startswith("plan: about"))
    assert float(line.split(" at ")[1].split()[0].replace(",", "")) > 0, line  # not "0 tokens/s"
    assert "h of training" not in line, line  # 4 tiny steps: seconds, not hours


def test_resumed_plan_counts_the_steps_left(tmp_path, capsys):
    data, run = abc_file(tmp_path), tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *SMALL_RUN]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--steps", "10"]) == 0
    err = capsys.readouterr().err
    assert "steps 4 to 10 = 384 tokens to go" in err, err  # 6 steps x 8 windows x 8 tokens


@pytest.mark.parametrize("budget, says", [([], "the same command with --resume\n"),
                                          (["--time-budget", "5m"], "with --resume and without --time-budget\n")])
def test_an_interrupted_run_says_which_command_resumes_it(tmp_path, capsys, monkeypatch, budget, says):
    # It said "continue with --resume"; a run with --time-budget resumed so is refused ("drop --time-budget").
    from build_llm.cli import train as train_cli
    from build_llm.train.loop import TrainingStopped

    def stopped(*args, **kwargs):
        raise TrainingStopped("interrupted at step 3/9; checkpoint saved in run/checkpoint; continue: the same "
                              "command with --resume", 130)

    monkeypatch.setattr(train_cli, "run_training", stopped)
    code, _, err = cli(capsys, "train", "--data", abc_file(tmp_path, 100), "--out", tmp_path / "run", *budget)
    assert code == 130 and err.endswith(says) and err.count("\n") == 1, err
