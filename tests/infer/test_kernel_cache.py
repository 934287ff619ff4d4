"""The kernel cache loads only a library this user built: planted libraries, links, files and directories others
may write, and libraries whose hash is not the recorded one are refused, and a refused library never runs.

These tests need a C compiler, not AVX-512: the kernels' source is replaced by a stub exporting the same names
(and `which()`, 1), compiled by the real build path. The planted library exports the same names (`which()` is 2)
and, when loaded, writes the file named by $PLANTED_MARKER from a constructor: had it been loaded, the marker
exists."""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from build_llm.infer import kernels

CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None or not Path("/proc/self/fd").is_dir(),
                                reason="the kernel cache needs a C compiler and /proc (Linux)")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="planting as another user needs root (to take uid 65534)")
OTHER_UID = 65534  # nobody

EXPORTS = ("void matvec_bf16(void) {}\nvoid matvec_int8(void) {}\nvoid matvec_int4(void) {}\n"
           "int decode_step(void) { return 0; }\nint kernels_wide(void) { return 0; }\n"
           "void kernels_pool_stats(void) {}\nvoid kernels_pool_hold(void) {}\nvoid kernels_pool_shutdown(void) {}\n")
STUB = EXPORTS + "int which(void) { return 1; }\n"
PLANTED = EXPORTS + """int which(void) { return 2; }
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("PLANTED_MARKER");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("the planted library ran\\n", f); fclose(f); }
}
"""
BUILT = STUB + kernels.build_note()  # the text compiled: the source and how it is compiled
NAME = "matvec-" + hashlib.sha256(BUILT.encode()).hexdigest()[:16]  # the name the stub's library is cached under


@pytest.fixture(scope="module")
def planted_bytes(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    (d / "p.c").write_text(PLANTED)
    subprocess.run([CC, "-shared", "-fPIC", str(d / "p.c"), "-o", str(d / "p.so")], check=True)
    return (d / "p.so").read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache directory of this user (0700), the stub as the kernels' source, AVX-512 pretended."""
    (tmp_path / "kernels.c").write_text(STUB)
    monkeypatch.setattr(kernels, "SOURCE", tmp_path / "kernels.c")
    monkeypatch.setattr(kernels, "_cpu_supported", lambda: True)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.delenv("BUILD_LLM_KERNELS", raising=False)
    monkeypatch.setenv("PLANTED_MARKER", str(tmp_path / "marker"))
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("BUILD_LLM_CACHE", str(d))
    return d


def record(library: bytes, source: str = BUILT) -> str:
    return json.dumps({"source_sha256": hashlib.sha256(source.encode()).hexdigest(),
                       "library_sha256": hashlib.sha256(library).hexdigest()})


def plant(directory: Path, library: bytes, mode: int = 0o755) -> None:
    """What an attacker would leave: the library at the cached name, with a record that matches it."""
    (directory / f"{NAME}.so").write_bytes(library)
    (directory / f"{NAME}.json").write_text(record(library))
    for suffix in (".so", ".json"):
        os.chmod(directory / (NAME + suffix), mode)


def load_and_check(cache: Path, capsys, note: str | None):
    """Load; the stub (never the planted library) is what loaded, with `note` (a piece of the one line) or none."""
    lib = kernels._load()
    assert not (cache.parent / "marker").exists(), "the planted library was loaded and ran"
    assert lib is not False and lib.which() == 1
    err = capsys.readouterr().err
    if note is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("build-llm: ") and note in err, err
    return lib


def test_other_compiler_flags_build_another_library(cache, capsys, monkeypatch):
    load_and_check(cache, capsys, None)
    monkeypatch.setattr(kernels, "CFLAGS", (*kernels.CFLAGS, "-DOTHER_FLAGS"))
    other = "matvec-" + hashlib.sha256((STUB + kernels.build_note()).encode()).hexdigest()[:16]
    assert other != NAME
    load_and_check(cache, capsys, None)  # built again under its own name: not the first flags' library loaded
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}{s}" for n in (NAME, other) for s in (".json", ".so"))


def test_a_fresh_cache_is_built_then_loaded_as_is(cache, capsys, monkeypatch):
    load_and_check(cache, capsys, None)
    so, rec = cache / f"{NAME}.so", cache / f"{NAME}.json"
    assert json.loads(rec.read_text())["library_sha256"] == hashlib.sha256(so.read_bytes()).hexdigest()
    inode = so.stat().st_ino

    def no_compiling(*args):
        raise AssertionError("a trusted cached library was compiled again")
    monkeypatch.setattr(kernels, "_compile", no_compiling)
    load_and_check(cache, capsys, None)  # the fast path: checked and loaded, nothing built
    assert so.stat().st_ino == inode


@pytest.mark.parametrize("mode", [0o775, 0o757])
def test_a_library_writable_by_group_or_others_is_refused_and_rebuilt(cache, capsys, planted_bytes, mode):
    plant(cache, planted_bytes, mode)
    load_and_check(cache, capsys, "writable by group or others")
    assert (cache / f"{NAME}.so").stat().st_mode & 0o022 == 0  # rebuilt in its place, private


def test_a_symlink_at_the_name_is_refused_and_replaced_not_followed(cache, capsys, planted_bytes, tmp_path):
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(planted_bytes)
    os.chmod(elsewhere, 0o755)
    (cache / f"{NAME}.so").symlink_to(elsewhere)
    (cache / f"{NAME}.json").write_text(record(planted_bytes))
    load_and_check(cache, capsys, "symbolic link")
    assert not (cache / f"{NAME}.so").is_symlink()
    assert elsewhere.read_bytes() == planted_bytes  # the link's target is left alone


def test_a_library_whose_hash_is_not_the_recorded_one_is_refused(cache, capsys, planted_bytes):
    plant(cache, planted_bytes)
    (cache / f"{NAME}.json").write_text(record(planted_bytes + b"\0"))
    load_and_check(cache, capsys, "not the library its record")
    rec = json.loads((cache / f"{NAME}.json").read_text())
    assert rec["library_sha256"] == hashlib.sha256((cache / f"{NAME}.so").read_bytes()).hexdigest()


def test_a_record_for_another_source_is_refused(cache, capsys, planted_bytes):
    plant(cache, planted_bytes)
    (cache / f"{NAME}.json").write_text(record(planted_bytes, source=STUB + "\n"))
    load_and_check(cache, capsys, "not the library its record")


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_cache_directory_others_may_write_is_left_alone_and_the_kernels_built_privately(cache, capsys,
                                                                                        planted_bytes, mode):
    plant(cache, planted_bytes)
    os.chmod(cache, mode)
    load_and_check(cache, capsys, "compiled for this run only")
    assert (cache / f"{NAME}.so").read_bytes() == planted_bytes  # not ours to change: untouched
    assert sorted(p.name for p in cache.iterdir()) == [f"{NAME}.json", f"{NAME}.so"]  # nothing left in it


def test_a_cache_directory_that_is_a_symlink_is_not_used(cache, capsys, planted_bytes, tmp_path, monkeypatch):
    plant(cache, planted_bytes)
    (tmp_path / "link").symlink_to(cache)
    monkeypatch.setenv("BUILD_LLM_CACHE", str(tmp_path / "link"))
    load_and_check(cache, capsys, "symbolic link")


def test_under_umask_000_the_cache_is_created_private(cache, capsys, monkeypatch):
    fresh = cache / "new" / "build-llm"
    monkeypatch.setenv("BUILD_LLM_CACHE", str(fresh))
    old = os.umask(0)
    try:
        load_and_check(cache, capsys, None)
    finally:
        os.umask(old)
    for path in (fresh, fresh / f"{NAME}.so", fresh / f"{NAME}.json"):
        assert path.stat().st_mode & 0o077 & ~0o055 == 0, oct(path.stat().st_mode)  # at most r-x for others
    assert fresh.stat().st_mode & 0o777 == 0o700
    load_and_check(cache, capsys, None)  # and trusted next time


def test_a_relative_cache_is_made_absolute(cache, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUILD_LLM_CACHE", "rel")
    assert kernels._cache_dir() == tmp_path / "rel"
    load_and_check(cache, capsys, None)
    assert (tmp_path / "rel" / f"{NAME}.so").is_file()


def test_a_library_without_the_expected_symbols_is_a_clear_fallback(cache, capsys):
    kernels.SOURCE.write_text("int matvec_bf16(void) { return 0; }\n")
    assert kernels._load() is False
    err = capsys.readouterr().err
    assert err == ("build-llm: the kernel library lacks matvec_int8, matvec_int4, decode_step, kernels_wide, "
                   "kernels_pool_stats, kernels_pool_hold, kernels_pool_shutdown; using PyTorch kernels instead\n")


def test_no_compiler_falls_back_quietly_as_before(cache, capsys, monkeypatch):
    monkeypatch.setenv("CC", str(cache / "no-such-compiler"))
    assert kernels._load() is False
    assert capsys.readouterr().err == ""


def test_open_trusted_decides_on_what_it_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # would block a plain open for reading
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    for path, why in [("fifo", "not a regular file"), ("link", "a symbolic link"), (".", "not a regular file")]:
        with pytest.raises(kernels.Refused, match=why):
            kernels.open_trusted(tmp_path / path)
    with pytest.raises(kernels.Refused, match="not a directory"):
        kernels.open_trusted(tmp_path / "file", directory=True)
    with pytest.raises(FileNotFoundError):
        kernels.open_trusted(tmp_path / "absent")
    os.close(kernels.open_trusted(tmp_path / "file"))


@pytest.fixture
def shared_dir():
    """A directory outside root's private pytest tree, so that uid 65534 can reach it."""
    d = Path(tempfile.mkdtemp(prefix="build-llm-shared-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def as_other_user(script: str, path: Path, data: bytes = b"") -> None:
    """Run the shell `script` on `path` as uid 65534, in a child process that has dropped root."""
    try:
        subprocess.run(["sh", "-c", script, "sh", str(path)], input=data, user=OTHER_UID, group=OTHER_UID,
                       check=True, capture_output=True)
    except (PermissionError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot run a process as uid {OTHER_UID} here: {e}")


def plant_as_other_user(directory: Path, library: bytes) -> None:
    as_other_user('cat > "$1"', directory / f"{NAME}.so", library)
    as_other_user('cat > "$1"', directory / f"{NAME}.json", record(library).encode())  # the attacker can hash, too
    assert (directory / f"{NAME}.so").stat().st_uid == OTHER_UID


@as_root
def test_a_library_planted_by_another_user_in_a_shared_cache_never_runs(cache, capsys, planted_bytes, shared_dir,
                                                                        monkeypatch):
    shared = shared_dir / "cache"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # a shared BUILD_LLM_CACHE, as /tmp: anyone may add files
    monkeypatch.setenv("BUILD_LLM_CACHE", str(shared))
    plant_as_other_user(shared, planted_bytes)
    load_and_check(cache, capsys, "writable by group or others")


@as_root
def test_a_cache_directory_made_by_another_user_before_us_is_not_used(cache, capsys, planted_bytes, shared_dir,
                                                                      monkeypatch):
    os.chmod(shared_dir, 0o1777)  # say /tmp, with BUILD_LLM_CACHE=/tmp/cache
    as_other_user('mkdir -m 755 "$1"', shared_dir / "cache")
    plant_as_other_user(shared_dir / "cache", planted_bytes)
    monkeypatch.setenv("BUILD_LLM_CACHE", str(shared_dir / "cache"))
    load_and_check(cache, capsys, f"belongs to uid {OTHER_UID}")


@as_root
def test_a_library_of_another_user_in_our_own_cache_is_refused(cache, capsys, planted_bytes):
    plant(cache, planted_bytes)
    for suffix in (".so", ".json"):
        os.chown(cache / (NAME + suffix), OTHER_UID, OTHER_UID)
    load_and_check(cache, capsys, f"belongs to uid {OTHER_UID}")
    assert (cache / f"{NAME}.so").stat().st_uid == os.geteuid()


@as_root
def test_a_cache_directory_of_another_user_is_not_used(cache, capsys, planted_bytes):
    plant(cache, planted_bytes)
    os.chown(cache, OTHER_UID, OTHER_UID)
    load_and_check(cache, capsys, f"belongs to uid {OTHER_UID}")
