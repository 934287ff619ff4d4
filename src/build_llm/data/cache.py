"""The token cache: a corpus tokenized once is reused by every later run, whatever its --out.

Where: $BUILD_LLM_CACHE if set ("off" turns the cache off), else $XDG_CACHE_HOME/build-llm, else
~/.cache/build-llm. The directory is created 0700 and used only while it is this user's and closed
to others (another owner, or a group- or world-writable mode, and the cache is not used: a line
says so). It holds data only (token files and JSON, read as data; nothing in it is ever run):
- scans/<hash of the file paths>.json: what one pass over a corpus learned (its SHA-256, characters,
  lengths) under the files' identity (path, size, modification and change times, inode). The
  change time moves on every write to a file and cannot be set back by its owner, so a file
  changed since is read again; an unchanged corpus is not read at all.
- tokens/<hash of corpus SHA-256, tokenizer SHA-256 and split>/: tokens.bin and meta.json, which a
  run directory's data/ links to (a hard link: removing the cache keeps the run's tokens).
Remove the directory to reclaim its space; nothing else depends on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable

from build_llm.errors import UsageError
from build_llm.store.fsio import read_json, write_json

CACHE_ENV = "BUILD_LLM_CACHE"


def cache_root() -> Path | None:
    """The user's cache directory (made 0700 if absent), or None when it is off or not safely ours."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen == "off":
        return None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    root = Path(chosen) if chosen else Path(base) / "build-llm"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(root, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        print(f"build-llm: not using the token cache {str(root)!r}: it must be a directory of yours that others "
              f"cannot write (chmod 700 it, or set {CACHE_ENV})", file=sys.stderr)
        return None
    return root


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:40]


def file_identity(files: list[Path]) -> list[list[Any]]:
    """What changes when a file's content may have: path, size, modification and change times, inode."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    return out


def cached_scan(files: list[Path], scan: Callable[[], Any]) -> Any:
    """scan() (a JSON value: what one pass over the files learns), remembered under the files'
    identity: called again on unchanged files it returns without reading them."""
    root = cache_root()
    identity = file_identity(files)
    if root is None:
        return scan()
    path = root / "scans" / f"{_digest([i[0] for i in identity])}.json"
    try:
        record = read_json(path)
        if record["identity"] == identity:
            return record["scan"]
    except (UsageError, OSError, KeyError, TypeError):
        pass  # absent, damaged or of other files: scan again
    result = scan()
    if file_identity(files) == identity:  # unchanged while it was read
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_json(path, {"identity": identity, "scan": result})
    return result


def tokens_dir(key: dict[str, Any]) -> Path | None:
    """The cache folder for the tokens of `key` (the corpus's and tokenizer's hashes, the split), or
    None without a cache."""
    root = cache_root()
    return None if root is None else root / "tokens" / _digest(key)
