"""fsio: atomic files and directories, ownership markers, run-directory locks, stale temporaries, modes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from build_llm.store import fsio
from build_llm.errors import UsageError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "page.html"
    target.write_text("old")
    fsio.write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("precious")
    with pytest.raises(RuntimeError):
        with fsio.atomic_write(target) as fh:
            fh.write("half")
            raise RuntimeError("killed half-way")
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_a_planted_symlink_at_a_predictable_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    for name in (".page.html.tmp", ".page.html.tmp-aaaaaaaa"):
        (tmp_path / name).symlink_to(victim)
    fsio.write_text(tmp_path / "page.html", "<p>page</p>")
    assert victim.read_text() == "do not touch"
    assert (tmp_path / "page.html").read_text() == "<p>page</p>"


def test_files_and_directories_get_the_modes_the_umask_allows(tmp_path, umask_022):
    fsio.write_text(tmp_path / "f.txt", "x")
    assert mode(tmp_path / "f.txt") == 0o644
    with fsio.replace_dir(tmp_path / "d", "checkpoint") as tmp:
        (tmp / "a").write_text("a")
    assert mode(tmp_path / "d") == 0o755
    os.umask(0o077)
    fsio.write_text(tmp_path / "g.txt", "x")
    assert mode(tmp_path / "g.txt") == 0o600


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        fsio.write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_claim_dir_creates_adopts_empty_and_refuses_foreign(tmp_path):
    new = fsio.claim_dir(tmp_path / "a" / "run", "run")
    assert fsio.is_ours(new, "run")
    fsio.claim_dir(new, "run")  # ours: fine again
    empty = tmp_path / "empty"
    empty.mkdir()
    fsio.claim_dir(empty, "run")
    assert fsio.is_ours(empty, "run")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="did not create"):
        fsio.claim_dir(foreign, "run")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(UsageError, match="not a bench directory"):
        fsio.claim_dir(new, "bench")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        fsio.claim_dir(tmp_path / "file", "run")


def test_a_forged_or_symlinked_marker_does_not_make_a_directory_ours(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / fsio.MARKER).write_text('{"kind": "run"}')  # not ours: no tool field
    (d / "data").write_text("x")
    assert not fsio.is_ours(d)
    real = tmp_path / "real"
    fsio.claim_dir(real, "run")
    e = tmp_path / "e"
    e.mkdir()
    (e / fsio.MARKER).symlink_to(real / fsio.MARKER)
    assert not fsio.is_ours(e)
    with pytest.raises(UsageError):
        fsio.remove_dir(d)
    assert (d / "data").exists()


def test_replace_dir_swaps_without_a_moment_with_neither(tmp_path):
    target = tmp_path / "ckpt"
    with fsio.replace_dir(target, "checkpoint") as tmp:
        (tmp / "w").write_text("1")
    with fsio.replace_dir(target, "checkpoint") as tmp:
        # while the new one is written, the old one is complete in place
        assert (target / "w").read_text() == "1"
        (tmp / "w").write_text("2")
    assert (target / "w").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .old, no temporary left


def test_replace_dir_refuses_a_foreign_directory_and_keeps_it(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "README.md").write_text("theirs")
    with pytest.raises(UsageError, match="did not create"):
        with fsio.replace_dir(target, "checkpoint") as tmp:
            (tmp / "w").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["README.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_fallback_swap_never_deletes_a_foreign_old_sibling(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    target = tmp_path / "x"
    with fsio.replace_dir(target, "checkpoint") as tmp:
        (tmp / "w").write_text("1")
    old = tmp_path / "x.old"
    old.mkdir()
    (old / "precious").write_text("mine")
    with fsio.replace_dir(target, "checkpoint") as tmp:
        (tmp / "w").write_text("2")
    assert (target / "w").read_text() == "2"
    kept = [p for p in tmp_path.rglob("precious")]
    assert len(kept) == 1 and kept[0].read_text() == "mine"


def test_a_failed_directory_write_leaves_the_old_one(tmp_path):
    target = tmp_path / "ckpt"
    with fsio.replace_dir(target, "checkpoint") as tmp:
        (tmp / "w").write_text("1")
    with pytest.raises(OSError):
        with fsio.replace_dir(target, "checkpoint") as tmp:
            (tmp / "w").write_text("2")
            raise OSError(28, "No space left on device")
    assert (target / "w").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


KILLED_WRITER = """
import os, sys, types
pkg = types.ModuleType("build_llm")  # fsio alone, without importing torch through the package
pkg.__path__ = [sys.argv[3]]
sys.modules["build_llm"] = pkg
from build_llm.store import fsio
kind = sys.argv[2]
if kind == "dir":
    with fsio.replace_dir(sys.argv[1], "checkpoint") as tmp:
        (tmp / "w").write_text("half")
        os.kill(os.getpid(), 9)
else:
    with fsio.atomic_write(sys.argv[1]) as fh:
        fh.write("half"); fh.flush()
        os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_temporaries_of_a_killed_process_are_cleaned_and_live_ones_kept(tmp_path, kind):
    target = tmp_path / ("ckpt" if kind == "dir" else "page.html")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), kind, str(Path(fsio.__file__).parents[1])])
    assert proc.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name != target.name]
    assert len(left) == 1 and left[0].name.startswith(f".{target.name}.tmp-")
    # a look-alike that is not ours (a directory without our marker) is never removed
    lookalike = tmp_path / f".{target.name}.tmp-zzzzzzzz"
    lookalike.mkdir()
    (lookalike / "user-file").write_text("x")
    if kind == "dir":
        with fsio.replace_dir(target, "checkpoint") as tmp:
            # while this process writes, its own temporary is live: another cleaner keeps it
            assert fsio.clean_stale(target) == []
            assert tmp.exists()
            (tmp / "w").write_text("whole")
        assert (target / "w").read_text() == "whole"
    else:
        fsio.write_text(target, "whole")
        assert target.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, lookalike.name])


def test_lock_dir_refuses_a_second_holder(tmp_path):
    run = fsio.claim_dir(tmp_path / "run", "run")
    code = KILLED_WRITER.split("from build_llm")[0] + (
        "import time\nfrom build_llm.store import fsio\n"
        f"with fsio.lock_dir({str(run)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, "x", "x", str(Path(fsio.__file__).parents[1])],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match="in use by another build-llm process"):
            with fsio.lock_dir(run):
                pass
    finally:
        holder.kill()
        holder.wait()
    with fsio.lock_dir(run):  # released when its holder died
        pass


def test_a_copy_of_our_directory_is_not_ours(tmp_path):
    import shutil

    with fsio.replace_dir(tmp_path / "export", "hf-export") as tmp:
        (tmp / "config.json").write_text("{}")
    assert fsio.is_ours(tmp_path / "export", "hf-export")
    shutil.copytree(tmp_path / "export", tmp_path / "copy")  # e.g. cp -a: another directory, the same files
    assert not fsio.is_ours(tmp_path / "copy")


def test_files_a_user_added_to_our_directory_block_its_replacement(tmp_path):
    target = tmp_path / "export"
    with fsio.replace_dir(target, "hf-export") as tmp:
        (tmp / "config.json").write_text("{}")
    (target / "README.md").write_text("my notes")
    with pytest.raises(UsageError, match="README.md"):
        with fsio.replace_dir(target, "hf-export") as tmp:
            (tmp / "config.json").write_text("{}")
    assert (target / "README.md").read_text() == "my notes"
    with pytest.raises(UsageError):
        fsio.remove_dir(target)


def test_a_directory_replaced_whole_may_not_be_the_current_one_or_hold_it(tmp_path, monkeypatch):
    """`--out .` used to build the new directory inside the one it replaces, then refuse it as 'non-empty' (it was
    empty: the temporary directory was in it)."""
    here = tmp_path / "here"
    (here / "deeper").mkdir(parents=True)
    for cwd, out in ((here, "."), (here, str(here)), (here / "deeper", ".."), (here / "deeper", "../")):
        monkeypatch.chdir(cwd)
        with pytest.raises(UsageError, match="is the current directory or holds it"):
            with fsio.replace_dir(out, "inspect"):
                pass
    monkeypatch.chdir(tmp_path)
    with fsio.replace_dir(here / "deeper", "inspect") as tmp:  # beside the current directory: fine
        (tmp / "a.txt").write_text("a")
    assert sorted(p.name for p in here.iterdir()) == ["deeper"] and (here / "deeper" / "a.txt").is_file()


def test_the_kind_a_directory_is_not_takes_its_article(tmp_path):
    # It said "not a inspect directory".
    fsio.claim_dir(tmp_path / "run", "run")
    with pytest.raises(UsageError, match="is a build-llm run directory, not an inspect directory"):
        fsio.claim_dir(tmp_path / "run", "inspect")
