"""The red-team pass's data-loss cases (issue 12), each reproduced through the command line: the tool
writes only where told, never deletes what it did not create, and refuses a non-empty foreign directory."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from build_llm import GPTModel, get_tokenizer, save_checkpoint
from build_llm.cli import main
from build_llm.interop.hf import save_hf
from tiny import TINY


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` (hidden ones too) and its SHA-256: compared before and after."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """H: a Hugging Face directory written by build_llm.interop.hf.save_hf."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "H"
    save_hf(GPTModel(TINY).eval(), path, get_tokenizer("gpt2"))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """C: a checkpoint of this package."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("c") / "C"
    save_checkpoint(path, GPTModel(TINY).eval(), get_tokenizer("gpt2"))
    return path


def test_case1_export_hf_keeps_a_downloaded_model_folder(hf_dir, ckpt, tmp_path, capsys):
    # cp -a $H dl; touch dl/README.md; mkdir dl/onnx; export-hf --checkpoint $C --out dl
    dl = tmp_path / "dl"
    shutil.copytree(hf_dir, dl)
    (dl / "README.md").write_text("model card")
    (dl / "onnx").mkdir()
    (dl / "onnx" / "model.onnx").write_bytes(b"weights")
    before = tree(tmp_path)
    code, err = run(capsys, "export-hf", "--checkpoint", ckpt, "--out", dl)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "did not create" in err
    assert tree(tmp_path) == before


def test_case1_export_hf_keeps_files_a_user_added_to_an_export(ckpt, tmp_path, capsys):
    out = tmp_path / "export"
    assert run(capsys, "export-hf", "--checkpoint", ckpt, "--out", out)[0] == 0
    assert run(capsys, "export-hf", "--checkpoint", ckpt, "--out", out)[0] == 0  # our own export: replaced
    (out / "README.md").write_text("notes")
    before = tree(tmp_path)
    code, err = run(capsys, "export-hf", "--checkpoint", ckpt, "--out", out)
    assert code == 2 and "README.md" in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("verb", ["import-hf", "export-hf", "save_checkpoint"])
def test_case2_saving_never_deletes_a_sibling_old_directory(verb, hf_dir, ckpt, tmp_path, capsys):
    # mkdir x.old; touch x.old/precious; import-hf $H --out x (twice: the second replaces x)
    old = tmp_path / "x.old"
    old.mkdir()
    (old / "precious").write_text("mine")
    for _ in range(2):
        if verb == "import-hf":
            assert run(capsys, "import-hf", hf_dir, "--out", tmp_path / "x")[0] == 0
        elif verb == "export-hf":
            assert run(capsys, "export-hf", "--checkpoint", ckpt, "--out", tmp_path / "x")[0] == 0
        else:
            save_checkpoint(tmp_path / "x", GPTModel(TINY))
    assert (old / "precious").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "x.old"]


def test_case5_import_hf_refuses_to_replace_a_training_runs_checkpoint(hf_dir, tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert run(capsys, "train", "--data", small_text(tmp_path), "--out", run_dir, *TINY_RUN)[0] == 0
    before = tree(tmp_path)
    code, err = run(capsys, "import-hf", hf_dir, "--out", run_dir / "checkpoint")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "training run's checkpoint" in err
    assert tree(tmp_path) == before
    with pytest.raises(ValueError, match="training run's checkpoint"):  # the library says the same
        save_checkpoint(run_dir / "checkpoint", GPTModel(TINY))
    assert tree(tmp_path) == before


def test_case8_surprisal_does_not_follow_a_planted_symlink(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "page.html"
    (tmp_path / ".page.html.tmp").symlink_to(victim)  # the old predictable temporary name
    code, err = run(capsys, "surprisal", "--preset", "r-abc", "--max-tokens", "40", "--out", out)
    assert code == 0, err
    assert victim.read_text() == "precious"
    assert out.read_text().startswith("<!DOCTYPE html") or "<html" in out.read_text()
    assert not out.is_symlink()


# --- the trainer ---------------------------------------------------------------------------------
def small_text(folder: Path) -> Path:
    path = folder / "small.txt"
    path.write_text("a small text to train a tiny model on, quickly.\n" * 40)
    return path


TINY_RUN = ["--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "4", "--context-length", "8",
            "--emb-dim", "16", "--n-layers", "1", "--n-heads", "2"]


def test_case3_train_refuses_a_foreign_folder_without_a_checkpoint(tmp_path, capsys, monkeypatch):
    d = tmp_path / "d"
    (d / "data").mkdir(parents=True)
    (d / "metrics.jsonl").write_text("my numbers\n")
    (d / "data" / "meta.json").write_text('{"mine": true}')
    before = tree(tmp_path)
    code, err = run(capsys, "train", "--out", d, *TINY_RUN)
    assert code == 2 and "did not create" in err and len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == before
    # --data data --out . : the user's own data/meta.json next to the text
    (tmp_path / "text.txt").write_text("hello world, a small text to train on.\n" * 40)
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "train", "--data", "text.txt", "--out", ".", *TINY_RUN)
    assert code == 2 and "did not create" in err
    assert tree(tmp_path) == before | {"text.txt": tree(tmp_path)["text.txt"]}


def test_case4_a_second_train_on_a_locked_run_directory_is_refused(tmp_path, capsys):
    from build_llm.store import fsio

    text = small_text(tmp_path)
    out = fsio.claim_dir(tmp_path / "r", "run")
    with fsio.lock_dir(out):  # another process training there (flock is per open file: this conflicts too)
        before = tree(tmp_path)
        code, err = run(capsys, "train", "--data", text, "--out", out, *TINY_RUN)
        assert code == 2 and "in use by another build-llm process" in err
        assert tree(tmp_path) == before
    assert run(capsys, "train", "--data", text, "--out", out, *TINY_RUN)[0] == 0  # the lock released: it trains


def test_case6_divergence_never_saves_exploded_weights(tmp_path, capsys):
    from safetensors.torch import load_file

    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 30)
    out = tmp_path / "d"
    code, err = run(capsys, "train", "--data", text, "--out", out, "--lr", "1e30", "--steps", "5", "--eval-every", "1",
                    "--context-length", "16", "--emb-dim", "32", "--n-layers", "1", "--n-heads", "2",
                    "--batch-size", "4")
    assert code == 1 and "diverged" in err
    if (out / "checkpoint").exists():  # "the last good checkpoint": it must generate
        weights = load_file(out / "checkpoint" / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())
        code, err = run(capsys, "generate", "--checkpoint", out, "--prompt", "the", "--max-new-tokens", "5",
                        "--temperature", "1")
        assert code == 0, err
    else:
        assert "no checkpoint was saved" in err
        code, err = run(capsys, "generate", "--checkpoint", out, "--prompt", "the")
        assert code == 2 and "no checkpoint" in err


def test_case7_a_rejected_resume_leaves_the_run_untouched(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("abcabc abc cab\n" * 60)
    b.write_text("xyz zyx yxz\n" * 60)
    out = tmp_path / "r"
    assert run(capsys, "train", "--data", a, "--out", out, *TINY_RUN)[0] == 0
    before = tree(tmp_path)
    code, err = run(capsys, "train", "--data", b, "--out", out, "--resume", "--steps", "4")
    assert code == 2 and "the data differs" in err
    code, err = run(capsys, "train", "--data", a, "--tokenizer", "gpt2", "--out", out, "--resume", "--steps", "4")
    assert code == 2 and "the tokenizer differs" in err
    assert tree(tmp_path) == before


def test_resume_with_steps_at_or_below_the_saved_step_is_refused(tmp_path, capsys):
    text = small_text(tmp_path)
    out = tmp_path / "r"
    assert run(capsys, "train", "--data", text, "--out", out, *TINY_RUN)[0] == 0
    before = tree(tmp_path)
    for steps in ("2", "1"):
        code, err = run(capsys, "train", "--data", text, "--out", out, "--resume", "--steps", steps)
        assert code == 2 and "already at step 2" in err
    assert tree(tmp_path) == before


@pytest.mark.slow  # a subprocess that trains: about a minute on a shared machine
def test_sigterm_during_a_long_step_stops_between_micro_batches(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "build_llm.cli", "train", "--out", str(out), "--steps", "3",
                             "--grad-accum", "100000", "--batch-size", "1", "--context-length", "8", "--emb-dim", "16",
                             "--n-layers", "1", "--n-heads", "2", "--eval-batches", "1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)  # metrics.jsonl appears just before the loop
        time.sleep(3)  # inside the first step's 100,000 micro-batches (minutes of work)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert waited < 30, waited  # one micro-batch, a save and a plot, not the step's 100,000 micro-batches
    assert "interrupted during step 1/3" in err
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 0


# --- issue 20: outputs that are inputs, links, files the tool did not write, partial reports ------
def test_issue20_item3_a_planted_metrics_link_is_not_followed(tmp_path, capsys):
    # a run directory the tool claimed (as a failed run leaves it), with metrics.jsonl -> a user's file
    from build_llm.store import fsio

    text = small_text(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = fsio.claim_dir(tmp_path / "runA", "run")
    (out / "metrics.jsonl").symlink_to(victim)
    code, err = run(capsys, "train", "--data", text, "--out", out, *TINY_RUN)
    assert code == 0, err
    assert victim.read_text() == "precious"
    assert not (out / "metrics.jsonl").is_symlink() and json.loads((out / "metrics.jsonl").read_text())["step"] == 2


def test_issue20_item3_metrics_are_appended_without_following_a_link(tmp_path):
    # a link planted after the run started (between two evaluations): refused, its target untouched
    from build_llm.store import fsio

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(fsio.UsageError, match="symbolic link"):
        fsio.open_append(tmp_path / "metrics.jsonl")
    assert victim.read_text() == "precious"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """(L, BASE): a LoRA instruction fine-tune L whose --init-from is the checkpoint BASE."""
    from tiny import tiny_cfg, write_instruct_json

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lora")
    base = root / "base"
    save_checkpoint(base, GPTModel(tiny_cfg(tokenizer.vocab_size)), tokenizer)
    write_instruct_json(root / "train.json", 12)
    code = main([str(a) for a in ("finetune", "instruct", "--init-from", base, "--data", root / "train.json",
                                  "--out", root / "L", "--steps", 1, "--lora-rank", 2, "--lora-alpha", 4)])
    assert code == 0
    return root / "L", base


@pytest.mark.parametrize("target", ["base", "adapter", "folder_holding_both"])
def test_issue20_item4_merge_lora_refuses_to_write_over_its_inputs(target, lora_run, tmp_path, capsys):
    lora, base = lora_run
    out = {"base": base, "adapter": lora / "checkpoint", "folder_holding_both": base.parent}[target]
    before = tree(base.parent)
    code, err = run(capsys, "merge-lora", "--checkpoint", lora, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is also the input" in err, err
    assert tree(base.parent) == before
    assert run(capsys, "merge-lora", "--checkpoint", lora, "--out", tmp_path / "merged")[0] == 0  # elsewhere: fine


def assert_keeps_input_and_foreign(capsys, folder: Path, argv: tuple, data: Path, foreign: Path) -> None:
    """`argv --out` its own input `data` (with --force too) and `--out` a file it did not write: each is
    refused in one line, and nothing under `folder` changes."""
    before = tree(folder)
    for force in ([], ["--force"]):
        code, err = run(capsys, *argv, "--out", data, *force)
        assert code == 2 and "is also the input --data" in err and len(err.strip().splitlines()) == 1, err
    code, err = run(capsys, *argv, "--out", foreign)
    assert code == 2 and "did not write it" in err and "--force" in err and len(err.strip().splitlines()) == 1, err
    assert tree(folder) == before


def test_issue20_item5_tokenizer_train_never_writes_over_its_input_or_a_foreign_file(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, a small text to train a tokenizer on.\n" * 50)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    common = ("tokenizer", "train", "--data", corpus, "--vocab-size", 300)
    assert_keeps_input_and_foreign(capsys, tmp_path, common, corpus, notes)
    tok = tmp_path / "tok.json"
    for _ in range(2):  # a new file, then a tokenizer JSON (ours to replace)
        assert run(capsys, *common, "--out", tok)[0] == 0
    assert run(capsys, *common, "--out", notes, "--force")[0] == 0
    assert json.loads(notes.read_text())["model"]["type"] == "BPE"


def test_issue20_item5_surprisal_never_writes_over_its_input_or_a_foreign_file(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("ABCABCAB\nBCABCA\nCABCAB\n" * 3)
    page = tmp_path / "page.html"
    page.write_text("<html>my own page</html>")
    common = ("surprisal", "--preset", "r-abc", "--max-tokens", "20")
    assert_keeps_input_and_foreign(capsys, tmp_path, (*common, "--data", notes), notes, page)
    new = tmp_path / "new.html"
    for _ in range(2):  # a new file, then a page of ours
        assert run(capsys, *common, "--out", new)[0] == 0
    assert run(capsys, *common, "--out", page, "--force")[0] == 0 and "my own page" not in page.read_text()


def test_issue20_item5_bench_png_never_writes_over_a_foreign_file(tmp_path, capsys):
    png = tmp_path / "chart.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"a photograph" * 10)
    before = tree(tmp_path)
    code, err = run(capsys, "bench", "--quick", "--png", png)
    assert code == 2 and "--png" in err and "did not write it" in err and len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == before


def test_issue20_item5_a_chart_of_ours_is_recognised(tmp_path):
    from bench.test_bench import exact_results
    from build_llm.bench import plot_report
    from build_llm.store import fsio

    chart = plot_report(exact_results(), tmp_path / "chart.png")
    assert fsio.written_by_us(chart)
    fsio.check_overwrite(chart, force=False, what="--png")  # ours: replaced without --force


@pytest.mark.parametrize("verb", ["merge-lora", "export-hf", "inspect"])
def test_issue20_item6_a_symlinked_out_is_refused_up_front(verb, lora_run, ckpt, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "out"
    link.symlink_to(target)
    argv = {"merge-lora": ["--checkpoint", lora_run[0]], "export-hf": ["--checkpoint", ckpt],
            "inspect": ["--checkpoint", ckpt, "--prompt", "hello"]}[verb]
    code, err = run(capsys, verb, *argv, "--out", link)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is a symbolic link" in err, err
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]
    assert list(target.iterdir()) == []


def test_issue20_item7_temporary_files_of_a_killed_plot_go_on_the_next_run(tmp_path, capsys):
    from build_llm.store import fsio

    text = small_text(tmp_path)
    out = fsio.claim_dir(tmp_path / "r", "run")  # a run killed during its plot, before its first checkpoint
    left = [out / ".loss.png.tmp-k1ll3d_x", out / ".metrics.jsonl.tmp-abcd1234"]  # mkstemp's names
    for path in left:
        path.write_bytes(b"half a file")
    mine = out / ".loss.png.tmp-mine"  # not one of our temporary names: a user's
    mine.write_text("mine")
    # the next run diverges at once (no evaluation, no plot): the leftovers still go
    code, err = run(capsys, "train", "--data", text, "--out", out, *TINY_RUN, "--lr", "1e30", "--eval-every", "1")
    assert code in (0, 1), err
    assert not any(p.exists() for p in left) and mine.read_text() == "mine"


def test_issue20_item7_a_bench_report_is_written_whole_or_not_at_all(tmp_path):
    # a disk that fills after the two small files (RLIMIT_FSIZE: writing past the limit fails with EFBIG)
    import subprocess
    import sys

    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from bench.test_bench import exact_results
import build_llm.cli.bench as cli_bench
from build_llm.cli import main
from build_llm.bench import format_report, to_json
r = exact_results()
cli_bench.run_bench = lambda **kw: r  # the measurements are made up; the writing is real
limit = max(len(to_json(r)), len(format_report(r))) + 2048  # room for bench.json and bench.txt, not the chart
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(["bench", "--out", sys.argv[1]]))
"""
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists() or sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []
    assert [p.name for p in tmp_path.iterdir()] in ([], ["report"])  # no temporary sibling left either


def test_issue20_item3_finetune_does_not_follow_a_planted_metrics_link(lora_run, tmp_path, capsys):
    # finetune classify --data empty.csv --out runA fails after claiming runA; a link is planted there
    from tiny import write_classification_csv

    base = lora_run[1]
    empty, data = tmp_path / "empty.csv", tmp_path / "train.csv"
    empty.write_text("text,label\n")
    write_classification_csv(data, 4)
    out = tmp_path / "runA"
    code, err = run(capsys, "finetune", "classify", "--init-from", base, "--data", empty, "--out", out)
    assert code == 2, err
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out.mkdir(exist_ok=True)  # claimed by the failed run (or, if not, an empty folder the next run claims)
    (out / "metrics.jsonl").symlink_to(victim)
    code, err = run(capsys, "finetune", "classify", "--init-from", base, "--data", data, "--out", out, "--steps", 2)
    assert code == 0, err
    assert victim.read_text() == "precious" and not (out / "metrics.jsonl").is_symlink()
