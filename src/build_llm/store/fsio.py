"""Writing without losing a user's files: the one place that holds the rule.

- The tool writes only where it was told. Every file appears atomically: it is written in full to
  an exclusively created temporary file with an unpredictable name beside it (never following a
  symlink planted there), then renamed over the target.
- It never deletes what it did not create. Each directory it creates holds a marker file
  (`.build-llm`, JSON naming the kind of directory, the directory's inode, so that a copy of it is
  not taken for ours, and the entries written, so that files a user added are never removed); only
  such directories are ever replaced or removed, and a non-empty directory without one is refused.
- A directory is replaced whole (a checkpoint, an export) by building the new one in a temporary
  sibling and exchanging the two in one system call (Linux renameat2 RENAME_EXCHANGE), so there is
  no moment with neither the old nor the new; where the file system cannot exchange, the old one is
  first renamed to `NAME.old`, which loaders fall back to.
- A run directory is locked (flock on `.build-llm.lock`) while a process writes there; a second
  process is refused instead of interleaving its files.
- Temporary files and directories left by a killed process are recognised (they are ours by name
  and marker, and their creator's lock is gone) and removed the next time the same target is written.
- An output is never one of the command's inputs, and an existing file there is replaced only if
  the tool wrote it (recognised by its content) or the user says --force. A file the tool appends
  to, and a directory it replaces whole, is never reached through a symbolic link.
- Files and directories get the modes the umask allows, like any file a program creates.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from build_llm.errors import UsageError

MARKER = ".build-llm"
LOCK_FILE = ".build-llm.lock"
_TMP = ".tmp-"
_OLD = ".old"


# --- modes ---------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process's umask (read from /proc where possible: os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_for_umask(fd_or_path: int | Path, directory: bool) -> None:
    # mkstemp/mkdtemp create 0600/0700 whatever the umask; give what an ordinary create would.
    mode = (0o777 if directory else 0o666) & ~current_umask()
    os.chmod(fd_or_path, mode)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- temporary names, and the ones a killed process left ------------------------------------------
def _check_parents(path: Path) -> None:
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a folder")


def _make_parent(path: Path) -> None:
    """Create `path`'s parent folders, saying clearly when one of them is a file."""
    _check_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)


def check_writable_file(path: str | os.PathLike[str], what: str = "--out") -> None:
    """Raise UsageError if a file could not be written at `path` (a folder there, a file above it);
    for a command to check before long work. Nothing is written."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a directory; give a file path")
    _check_parents(path)


# --- outputs that would destroy a user's file ------------------------------------------------------
# A file is "ours" when its content says so: a PNG whose Software text chunk is PNG_SOFTWARE, an HTML
# page carrying HTML_GENERATOR (matplotlib and our page writers put them there), or what a command's
# own `ours` test recognises (a tokenizer JSON, whose format admits no extra key). Anything else at an
# output path is a user's file: replaced only with --force. A new path is always fine.
PNG_SOFTWARE = "build-llm"
HTML_GENERATOR = '<meta name="generator" content="build-llm">'
_HEAD_BYTES = 4096  # the PNG text chunks precede the image data; the meta tag is in the <head>


def written_by_us(path: str | os.PathLike[str]) -> bool:
    """True if `path` is a regular file (not a link) whose first bytes show the tool wrote it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        head = os.read(fd, _HEAD_BYTES)
    finally:
        os.close(fd)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in head
    return HTML_GENERATOR.encode() in head


def _same_or_inside(inner: Path, outer: Path) -> bool:
    """True if `inner` is `outer` (by real path, or the same file by inode) or lies inside it."""
    real_in, real_out = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    if real_in == real_out or real_out in real_in.parents:
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(inner, outer)
    return False


def check_not_input(out: str | os.PathLike[str], inputs: dict[str, Any], what: str = "--out") -> None:
    """Raise UsageError if writing `out` would overwrite or replace one of `inputs` ({flag: path or
    paths}): `out` is the same file or directory, or a directory holding it."""
    for flag, paths in inputs.items():
        for path in [paths] if isinstance(paths, (str, os.PathLike)) else (paths or []):
            if _same_or_inside(Path(path), Path(out)):
                raise UsageError(f"{what} {str(out)!r} is also the input {flag} {str(path)!r}; writing it would "
                                 "destroy the input: give another path")


def check_overwrite(path: str | os.PathLike[str], force: bool, what: str = "--out", ours: Any = None) -> None:
    """Raise UsageError if `path` exists (a link counts) and is not a file the tool wrote (see
    written_by_us, or the `ours(path)` test given), unless `force`."""
    path = Path(path)
    if force or not (path.exists() or path.is_symlink()):
        return
    if not path.is_symlink() and (written_by_us(path) or (ours is not None and ours(path))):
        return
    raise UsageError(f"{what} {str(path)!r} already exists and build-llm did not write it; give a new file name, "
                     "or add --force to replace it")


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}{_TMP}"


def _is_tmp_name(name: str, target: Path) -> bool:
    # mkstemp/mkdtemp's suffix: 8 characters of [a-z0-9_]
    return re.fullmatch(re.escape(_tmp_prefix(target)) + r"[a-z0-9_]{8}", name) is not None


def _unlocked(path: Path) -> bool:
    """True if nobody holds a lock on `path` (a regular file, not followed if a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def clean_stale(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files and directories a killed process left while writing `target`:
    only those with our temporary name whose creator no longer holds its lock (and, for a directory,
    that hold our marker). Returns what was removed."""
    target = Path(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        if not _is_tmp_name(entry.name, target):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                if read_marker(path) is not None and _unlocked(path / MARKER):
                    shutil.rmtree(path)
                    removed.append(path)
            elif entry.is_file(follow_symlinks=False) and _unlocked(path):
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


# --- files ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary file path beside `path` (for writers that take a path, e.g.
    safetensors or matplotlib); when the block ends it replaces `path` in one rename. On an error the
    temporary file is removed and `path` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{str(path)!r} is a directory; give a file path")
    _make_parent(path)
    clean_stale(path)
    fd, tmp = None, None
    try:  # from the file's creation on: an interrupt (Ctrl-C, SIGTERM) removes it too
        fd, name = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)  # O_EXCL: never a planted link
        tmp = Path(name)
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks it live for clean_stale in other processes
        _chmod_for_umask(fd, directory=False)
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing (`mode` "w" or "wb"); it replaces `path` when the block ends."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: got {mode!r}; expected 'w' or 'wb'")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding, newline=None if "b" in mode else "") as fh:
            yield fh


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: float | None = None, **options: Any) -> Path:
    """A matplotlib figure written whole or not at all (a reader never sees half a picture), in the
    format its suffix names (PNG without one); `options` go to savefig."""
    path = Path(path)
    with atomic_path(path) as tmp:  # a temporary name: savefig cannot infer the format from it
        fig.savefig(tmp, dpi=dpi or fig.dpi, format=path.suffix[1:] or "png", **options)
    return path


def link_or_copy(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Make `path` the file `source` is (a hard link: no copy, and removing `source` keeps it), or a
    copy of it across file systems; `path` is replaced in one rename."""
    with atomic_path(path) as tmp:
        tmp.unlink()  # the name atomic_path reserved becomes the link
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def open_append(path: str | os.PathLike[str]) -> IO[str]:
    """Open a text file for appending (created if absent), never through a symbolic link: a link
    planted at the name would have us write into its target."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{str(path)!r} is a symbolic link; remove it") from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """JSON, strictly: a NaN or infinity raises instead of writing the invalid token `NaN`."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


# --- reading ------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike[str], what: str | None = None) -> Any:
    """Parse a JSON file a user may have handed us; whatever is wrong with it is a UsageError that
    names the file (not UTF-8, not JSON, nested too deeply to parse)."""
    path = Path(path)
    name = what or repr(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{name} does not parse as JSON: it is not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{name} does not parse as JSON ({e})") from None
    except RecursionError:
        raise UsageError(f"{name} nests too deeply to be a file build-llm reads") from None


# --- ownership -----------------------------------------------------------------------------------
def read_marker(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of a directory the tool created (this very directory, not a copy of it), or None."""
    path = Path(path)
    marker = path / MARKER
    try:
        if path.is_symlink() or marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 65536:
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
        inode = path.stat().st_ino
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "build-llm" or data.get("inode") != inode:
        return None
    return data


def _foreign_entries(path: Path, marker: dict[str, Any]) -> list[str]:
    """Entries of a directory we wrote whole that are not among those we wrote (a user added them)."""
    if not isinstance(marker.get("entries"), list):
        return []
    ours = {MARKER, LOCK_FILE, *map(str, marker["entries"])}
    return sorted(set(os.listdir(path)) - ours)


def is_ours(path: str | os.PathLike[str], kind: str | None = None) -> bool:
    marker = read_marker(path)
    return marker is not None and (kind is None or marker.get("kind") == kind)


def _marker_bytes(directory: Path, kind: str, entries: list[str] | None = None) -> bytes:
    data = {"tool": "build-llm", "kind": kind, "inode": directory.stat().st_ino}
    if entries is not None:
        data["entries"] = entries
    return (json.dumps(data) + "\n").encode()


def _write_marker(directory: Path, kind: str) -> int:
    """Create the marker exclusively; return its open descriptor (the caller may hold a lock on it)."""
    fd = os.open(directory / MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, _marker_bytes(directory, kind))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _holds_cwd(path: Path) -> bool:
    try:
        return _same_or_inside(Path.cwd(), path)
    except OSError:  # the current directory was deleted: nothing holds it
        return False


def check_writable_dir(path: str | os.PathLike[str], kind: str, what: str = "--out", whole: bool = False) -> None:
    """Raise UsageError unless `path` is absent, an empty directory, or a directory of `kind` that
    the tool created (and, with `whole`, for a directory to be replaced: holding only what the tool
    wrote there). Nothing is written."""
    path = Path(path)
    _check_parents(path)
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{what} {str(path)!r} is a dangling symbolic link; give a new or empty directory")
    if whole and path.is_symlink():  # replacing it whole would replace the link, not the folder it names
        raise UsageError(f"{what} {str(path)!r} is a symbolic link; give the directory itself "
                         f"({os.path.realpath(path)!r}) or a new path")
    if whole and _holds_cwd(path):  # its new version is built beside it, never inside
        raise UsageError(f"{what} {str(path)!r} is the current directory or holds it; replacing it whole would leave "
                         "this shell in a deleted directory: give a directory elsewhere (or run from another one)")
    if not path.exists():
        return
    if not path.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a file; give a directory path")
    if _is_empty_dir(path):
        return
    marker = read_marker(path)
    if marker is None:
        raise UsageError(f"{what} {str(path)!r} is a non-empty directory that build-llm did not create; "
                         "give a new or empty directory")
    if marker.get("kind") != kind:
        article = "an" if kind[:1] in "aeiou" or kind.startswith("hf") else "a"  # "an inspect", "an hf-export"
        raise UsageError(f"{what} {str(path)!r} is a build-llm {marker.get('kind')} directory, not {article} {kind} "
                         "directory; give a new or empty directory")
    extra = _foreign_entries(path, marker) if whole else []
    if extra:
        raise UsageError(f"{what} {str(path)!r} holds files build-llm did not write ({', '.join(extra[:3])}"
                         f"{', ...' if len(extra) > 3 else ''}) that replacing it would delete; move them out or "
                         "give a new or empty directory")


def claim_dir(path: str | os.PathLike[str], kind: str, what: str = "--out") -> Path:
    """Make `path` a directory of `kind` the tool owns: create it (with parents), adopt it if empty,
    or accept it if it already carries our marker of that kind; refuse anything else (UsageError)."""
    path = Path(path)
    check_writable_dir(path, kind, what)
    _make_parent(path)
    path.mkdir(exist_ok=True)
    if read_marker(path) is None:  # new or empty: mark it ours
        try:
            os.close(_write_marker(path, kind))
        except FileExistsError:
            check_writable_dir(path, kind, what)  # another process claimed it meanwhile
    return path


# --- replacing a directory whole -----------------------------------------------------------------
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where the fallback swap keeps the previous directory (loaders look there when `path` is missing)."""
    path = Path(path)
    return path.with_name(path.name + _OLD)


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Delete a directory the tool created (it carries our marker); refuse any other."""
    path = Path(path)
    marker = read_marker(path)
    if marker is None or _foreign_entries(path, marker):
        raise UsageError(f"{str(path)!r} holds files build-llm did not create; it is left alone")
    shutil.rmtree(path)


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike[str], kind: str, what: str = "--out") -> Iterator[Path]:
    """Yield a fresh temporary directory (marked `kind`) to fill; when the block ends it takes the
    place of `path` atomically and the previous directory there (which must be absent, empty, or
    ours of the same kind) is removed. On an error the temporary directory goes, `path` is untouched."""
    path = Path(path)
    check_writable_dir(path, kind, what, whole=True)
    _make_parent(path)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    fd = None
    try:
        _chmod_for_umask(tmp, directory=True)
        fd = _write_marker(tmp, kind)
        fcntl.flock(fd, fcntl.LOCK_EX)  # live: clean_stale in another process leaves it alone
        yield tmp
        entries = sorted(set(os.listdir(tmp)) - {MARKER})
        os.ftruncate(fd, 0)
        os.pwrite(fd, _marker_bytes(tmp, kind, entries), 0)
        for child in [*tmp.iterdir(), tmp]:
            if child.is_file() and not child.is_symlink():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        check_writable_dir(path, kind, what, whole=True)  # it may have changed while we wrote
        _swap_in(tmp, path, kind)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _swap_in(tmp: Path, path: Path, kind: str) -> None:
    if not path.exists() and not path.is_symlink():
        os.rename(tmp, path)
    elif path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
        shutil.rmtree(tmp)  # now the previous directory (ours or empty, checked by the caller)
    else:
        old = previous_path(path)
        if old.exists() or old.is_symlink():
            if not is_ours(old):  # not ours: move it aside, never delete it
                aside = Path(tempfile.mkdtemp(prefix=f"{old.name}.kept-", dir=path.parent))
                os.replace(old, aside / old.name)
            else:
                shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if is_ours(old) or _is_empty_dir(old):
            shutil.rmtree(old)
        return
    _fsync_dir(path.parent)


# --- locks ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def lock_dir(path: str | os.PathLike[str], what: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on a directory (flock on its `.build-llm.lock`) for the block; another
    process asking for it meanwhile gets a UsageError."""
    path = Path(path)
    lock = path / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{str(lock)!r} is a symbolic link; remove it") from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{what} {str(path)!r} is in use by another build-llm process; wait for it to "
                             "finish or give another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock
