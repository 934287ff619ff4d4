"""The red-team pass's data-loss cases (issue 12), each reproduced through the command line: the tool
writes only where told, never deletes what it did not create, and refuses a non-empty foreign directory."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from build_llm import GPTConfig, GPTModel, get_tokenizer, save_checkpoint
from build_llm.cli import main
from build_llm.hf import save_hf

TINY = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)


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
    """H: a Hugging Face directory written by build_llm.hf.save_hf."""
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
    assert run(capsys, "train", "--out", run_dir, "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
               "--batch-size", "4", "--context-length", "8", "--emb-dim", "16", "--n-layers", "1",
               "--n-heads", "2")[0] == 0
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
