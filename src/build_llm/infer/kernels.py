"""Matrix-vector kernels for decoding with bfloat16, int8 or int4 weights on an x86-64 CPU.

Decoding a token at batch 1 multiplies one row vector by every weight matrix, so it is bound by the
bytes of weights read from memory: 4 per weight in float32, 2 in bfloat16, 1 in int8, 1/2 in int4. To get
that gain, each weight must be widened inside the multiply loop, in registers, never written back to
memory. PyTorch's CPU kernels do not do this well on a CPU without bfloat16 instructions (AVX512-BF16 /
AMX): measured on the development machine (AVX-512F/BW only), its bfloat16 product ran no faster than
float32 and its weight-only int8 product at about half of the memory bound; PyTorch has no int4 product
that takes float activations.

The kernels are a few lines of C in kernels.c beside this file: for each block of weight rows, for the (at
most 16) input rows (a tile widened once for 4 of them in the AVX-512 code, for 2 in AVX2's int8 product; at
batch 16 a product is bound by the multiplications, not the reads), the weights are loaded, widened (bfloat16:
shifted into float32; int8: multiplied as integers with the input row rounded to int16, summed exactly in
int32; int4: the same with the input rounded to int8 per group of the weights' columns, max |x| / 127 a
group's step, ties to even) and accumulated in float32; int8 rows are then scaled by their per-row scale, int4
groups by their weight scale times the input's. One library serves every x86-64 CPU: AVX-512 intrinsics where
the CPU has AVX-512, else AVX2 intrinsics where it has AVX2 and FMA (int4: wherever it has them), else
portable C, chosen when it runs. The rows are shared among `torch.get_num_threads()` threads of the library's
own pool, not OpenMP's: a product is cut into chunks that the threads claim, the caller among them, and it is
done when every chunk is, so a thread whose core is busy elsewhere is never waited for (an OpenMP region waits
at its end for every thread; on busy cores, many times slower than one thread). The pool's workers start at
the first shared product, spin for `$BUILD_LLM_POOL_SPIN_US` microseconds (default 50) between products, then
sleep; a forked child makes its own. The numbers are the same bits on any count of threads.

The C source (shipped as package data) is compiled once per machine with the system's C compiler
into the user's cache (`$BUILD_LLM_CACHE`, else `$XDG_CACHE_HOME/build-llm`, else
`~/.cache/build-llm`), under a name holding a hash of the source, and called through ctypes. Where
that is not possible (no compiler, not Linux x86-64, not CPU tensors), `available()` is
False and callers use PyTorch's own kernels: same results up to float rounding (int4: up to the kernels'
rounding of the inputs to int8), only slower.
`BUILD_LLM_KERNELS=0` turns them off.

Loading a library runs its code, so a cached one is loaded only when no one but this user can have
put it there: the cache directory and the library (and its record, `matvec-<hash>.json`, holding the
library's SHA-256 from when this package built it) must be this user's, writable by no one else, not
symbolic links, and the library's SHA-256 the recorded one. Every check is made on an open file
descriptor and the library is loaded through that descriptor (`/proc/self/fd/N`), so the file
checked is the file loaded whatever happens to the path meanwhile. A library that fails a check is
rebuilt; a cache directory that fails one is left alone and the kernels are compiled for this run
in a private temporary directory; either way with one note on stderr saying why.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MAX_ROWS = 16  # input rows (tokens x batch) per C call; `matvec` takes longer inputs in pieces of this size

SOURCE = Path(__file__).with_name("kernels.c")  # the C source, shipped beside this file as package data


KINDS = {torch.bfloat16: 0, torch.int8: 1, torch.uint8: 2}  # the packed weight's dtype -> Lin.kind (BF16, INT8, INT4)


class Lin(ctypes.Structure):  # the C structs of `decode_step`, field for field
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("kind", ctypes.c_int64), ("group", ctypes.c_int64)]


class Block(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "post1_w", "post1_b", "post2_w",
                                                     "post2_b", "q_norm", "k_norm", "inv_freq")] + [
        ("window", ctypes.c_int64), ("qkv", Lin * 3), ("n_qkv", ctypes.c_int64), ("att_out", Lin), ("fc", Lin),
        ("up", Lin), ("ff_out", Lin), ("n_experts", ctypes.c_int64), ("top_k", ctypes.c_int64),
        ("norm_topk", ctypes.c_int64), ("router", ctypes.c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("n_layers", "emb_dim", "n_heads", "n_kv_heads", "head_dim",
                                                    "hidden", "vocab", "act", "rms")] + [
        ("eps", ctypes.c_float), ("att_scale", ctypes.c_float), ("emb_scale", ctypes.c_float),
        ("tok_emb", ctypes.c_void_p), ("pos_emb", ctypes.c_void_p), ("lnf_w", ctypes.c_void_p),
        ("lnf_b", ctypes.c_void_p), ("head", Lin), ("blocks", ctypes.POINTER(Block))]


ACTIVATIONS = {"gelu_tanh": 0, "gelu_erf": 1, "silu": 2}  # Model.act


_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
SYMBOLS = ("matvec_bf16", "matvec_int8", "matvec_int4", "decode_step", "kernels_wide",  # what the library must export
           "kernels_pool_stats", "kernels_pool_hold", "kernels_pool_shutdown")
CFLAGS = ("-O3", "-pthread", "-fPIC", "-shared")  # the compiler's flags (the library has no OpenMP: its own pool)
POOL_STATS = ("workers", "regions", "chunks_by_caller", "chunks_by_workers", "worker_sleeps", "caller_sleeps")


class Refused(Exception):
    """A cache file or directory that may not be trusted; the message says why."""


def _cache_dir() -> Path:
    """The cache directory, absolute: a relative $BUILD_LLM_CACHE is taken from the working directory now (so it
    cannot change meaning later); a relative $XDG_CACHE_HOME is ignored, as the XDG specification says."""
    if os.environ.get("BUILD_LLM_CACHE"):
        return Path(os.path.abspath(os.environ["BUILD_LLM_CACHE"]))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "build-llm"


def _cpu_supported() -> bool:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return " sse2" in flags  # every x86-64 CPU: the library picks its AVX-512 or portable code when it runs


def open_trusted(path: str | os.PathLike[str], dir_fd: int | None = None, directory: bool = False) -> int:
    """`path` (relative to `dir_fd` if given) opened read-only without following a symbolic link, when what was
    opened is a regular file (or a directory) of this user that no one else may write; else `Refused` saying
    why (FileNotFoundError when absent). The caller closes the descriptor."""
    kind = "directory" if directory else "regular file"
    # O_NONBLOCK: a FIFO at the name must not hang the open (it is then refused as not a regular file)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else os.O_NONBLOCK)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # O_NOFOLLOW on a link: ELOOP, or ENOTDIR with O_DIRECTORY
            link = stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
            raise Refused(f"{path} is {'a symbolic link' if link else 'not a ' + kind}") from None
        raise
    try:
        st = os.fstat(fd)
        if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
            raise Refused(f"{path} is not a {kind}")
        if st.st_uid != os.geteuid():
            raise Refused(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
        if st.st_mode & 0o022:
            raise Refused(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sha256(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    os.lseek(fd, 0, os.SEEK_SET)
    return h.hexdigest()


def open_cached(dir_fd: int, name: str, source: str) -> int:
    """The cached library `name`.so in the open cache directory, when it may be loaded: it and its record `name`.json
    pass `open_trusted`, and the record (written when this package built it from `source`) holds that source's
    and the library's SHA-256. Else `Refused` saying why; FileNotFoundError when either file is absent."""
    fd = open_trusted(name + ".json", dir_fd)
    try:
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    fd = open_trusted(name + ".so", dir_fd)
    try:
        if (not isinstance(record, dict) or record.get("source_sha256") != hashlib.sha256(source.encode()).hexdigest()
                or record.get("library_sha256") != _sha256(fd)):
            raise Refused(f"{name}.so is not the library its record {name}.json says was built")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_note() -> str:
    """A last line for the source saying how it is compiled: the cache's name and record hash the source with
    it, so that other flags or another compiler build another library rather than load one built otherwise."""
    return f"/* built by build-llm with: {_compiler()} {' '.join(CFLAGS)} */\n"


def _compile(source: str, tmp: Path) -> int:
    """Compile `source` in the new private directory `tmp`; the built library, open and checked."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler (cc) found")
    os.close(open_trusted(tmp, directory=True))  # made by mkdtemp: 0700, this user's (checked all the same)
    src, out = tmp / "matvec.c", tmp / "matvec.so"
    src.write_text(source, encoding="ascii")  # the very text that was hashed
    subprocess.run([compiler, *CFLAGS, str(src), "-o", str(out), "-lm"], check=True, capture_output=True, timeout=120)
    os.chmod(out, 0o755)  # the compiler made it 0777 & ~umask: with umask 000, writable by everyone
    return open_trusted(out)


def _build_cached(source: str, cache: Path, dir_fd: int, name: str) -> int:
    """Compile `source` and put the library and its record in the trusted cache directory (atomically, each by a
    rename); the library built, open."""
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        fd = _compile(source, Path(tmp))
        record = {"source_sha256": hashlib.sha256(source.encode()).hexdigest(), "library_sha256": _sha256(fd)}
        rec = os.open(Path(tmp) / "record.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(rec, "w", encoding="ascii") as f:
            json.dump(record, f)
        try:  # the library first: a crash between the renames leaves a record that does not match, so a rebuild
            os.replace(Path(tmp) / "matvec.so", name + ".so", dst_dir_fd=dir_fd)
            os.replace(Path(tmp) / "record.json", name + ".json", dst_dir_fd=dir_fd)
        except OSError:  # not cached (say, the directory moved meanwhile): this run still has the library it built
            pass
    return fd


def _library(source: str, cache: Path, notes: list[str]) -> int:
    """An open library built from `source` that may be loaded: the cached one, else one built now, into the cache
    when the cache directory may be trusted, else into a private temporary directory. Why a directory or file
    found was not used goes to `notes`."""
    name = "matvec-" + hashlib.sha256(source.encode()).hexdigest()[:16]
    try:
        os.makedirs(cache.parent, 0o700, exist_ok=True)  # a parent it makes is 0700, as XDG asks of ~/.cache
        try:
            os.mkdir(cache, 0o700)  # private whatever the umask (it only takes bits away)
        except FileExistsError:
            pass
        dir_fd = open_trusted(cache, directory=True)
    except (Refused, OSError) as e:  # a directory that cannot be made (read-only home, say) is no news: no note
        if isinstance(e, Refused):
            notes.append(f"not using the kernel cache: {e}; the kernels are compiled for this run only "
                         "(a cache directory must be yours and writable by you alone)")
        with tempfile.TemporaryDirectory() as tmp:
            return _compile(source, Path(tmp))  # the descriptor outlives the file: loaded through /proc
    try:
        try:
            return open_cached(dir_fd, name, source)
        except FileNotFoundError:
            pass
        except Refused as e:
            notes.append(f"not loading the cached kernels in {cache}: {e}; rebuilt them")
        return _build_cached(source, cache, dir_fd, name)
    finally:
        os.close(dir_fd)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    missing = [name for name in SYMBOLS if not hasattr(lib, name)]
    if missing:
        raise Refused(f"the kernel library lacks {', '.join(missing)}")
    for fn in (lib.matvec_bf16, lib.matvec_int8):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.matvec_int4.restype = None
    lib.matvec_int4.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    lib.kernels_wide.restype = ctypes.c_int
    lib.kernels_wide.argtypes = []
    lib.kernels_pool_stats.restype = lib.kernels_pool_hold.restype = lib.kernels_pool_shutdown.restype = None
    lib.kernels_pool_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    lib.kernels_pool_hold.argtypes = [ctypes.c_int]
    lib.kernels_pool_shutdown.argtypes = []
    lib.decode_step.restype = ctypes.c_int
    lib.decode_step.argtypes = ([ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int])
    return lib


def _load() -> ctypes.CDLL | bool:
    if os.environ.get("BUILD_LLM_KERNELS", "1") == "0" or not _cpu_supported():
        return False
    try:
        source = SOURCE.read_text(encoding="ascii") + build_note()
    except OSError:  # not installed with the package
        return False
    notes: list[str] = []
    lib: ctypes.CDLL | bool = False
    try:
        fd = _library(source, _cache_dir(), notes)
        # Loaded through the descriptor that was checked; it stays open so that the name stays this library's.
        lib = _bind(ctypes.CDLL(f"/proc/self/fd/{fd}"))
    except Refused as e:
        notes.append(str(e))
    except (OSError, subprocess.SubprocessError):  # no compiler, a failed build: PyTorch's kernels, as always
        pass
    if notes:  # one note, whatever happened
        print(f"build-llm: {notes[0]}{'' if lib else '; using PyTorch kernels instead'}", file=sys.stderr)
    return lib


def available() -> bool:
    """Whether the kernels run on this machine (compiled on the first call)."""
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib is not False


def wide() -> bool:
    """Whether the bfloat16 and int8 products run the AVX-512 code (else the portable C); False when the kernels
    are unavailable."""
    return available() and bool(_lib.kernels_wide())


def pool_stats() -> dict[str, int]:
    """The thread pool's counts since the process started (POOL_STATS): its workers now, the products shared
    (regions), the chunks the calling thread and the workers computed, how often workers and callers slept."""
    if not available():
        return dict.fromkeys(POOL_STATS, 0)
    out = (ctypes.c_int64 * len(POOL_STATS))()
    _lib.kernels_pool_stats(out)
    return dict(zip(POOL_STATS, out))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


TILE = (4, 32)  # rows x columns of the packed weight's tiles


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> the kernels' layout: zero-padded to (N4, K32) (multiples of 4 and 32), as tiles of 4 rows
    x 32 columns, tile after tile along k for each block of 4 rows: shape (N4 / 4, K32 / 32, 4, 32)."""
    n, k = weight.shape
    n4, k32 = -(-n // 4) * 4, -(-k // 32) * 32
    padded = torch.zeros(n4, k32, dtype=weight.dtype)
    padded[:n, :k] = weight
    return padded.view(n4 // 4, 4, k32 // 32, 32).transpose(1, 2).contiguous()  # (N4/4, K32/32, 4, 32)


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The (n, k) weight that `pack` laid out."""
    blocks, tiles = packed.shape[:2]
    return packed.transpose(1, 2).reshape(blocks * 4, tiles * 32)[:n, :k]


def pack_int4(q: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) int8 values in [-8, 7] -> matvec_int4's layout: (N, Kp / 2) uint8, K zero-padded to Kp (a multiple
    of `group`); within each group of columns, byte j holds value j + 8 (low 4 bits) and value j + group/2 + 8
    (high 4 bits)."""
    n, k = q.shape
    kp = -(-k // group) * group
    padded = torch.zeros(n, kp, dtype=torch.int16)
    padded[:, :k] = q
    halves = (padded + 8).view(n, kp // group, 2, group // 2)  # (N, groups, low/high half, group/2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).to(torch.uint8).reshape(n, kp // 2)


def unpack_int4(packed: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """The (N, k) int8 values that `pack_int4` laid out."""
    n, kp = packed.shape[0], packed.shape[1] * 2
    b = packed.view(n, kp // group, 1, group // 2).to(torch.int16)  # (N, groups, 1, group/2)
    halves = torch.cat([(b & 15) - 8, (b >> 4) - 8], dim=2)  # (N, groups, 2, group/2)
    return halves.reshape(n, kp)[:, :k].to(torch.int8)


def matvec(x: torch.Tensor, packed: torch.Tensor, n: int, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, group: int = 0) -> torch.Tensor:
    """(..., K) float32 x the (n, K) weight that `pack` (bfloat16, int8) or `pack_int4` (uint8, with `group`)
    laid out -> (..., n) float32: x @ (scale * W).T + bias, MAX_ROWS rows of x at a time. CPU tensors, when
    `available()`; scale is float32 (n,) for int8, bfloat16 (n, groups) for int4; bias float32 (n,).
    (Decoding calls this about 50 times a token: it stays lean.)"""
    K = x.shape[-1]
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    y = x.new_empty(*x.shape[:-1], n)
    rows, threads = x.numel() // K if K else 0, torch.get_num_threads()
    w, s, b, px, py = packed.data_ptr(), _ptr(scale), _ptr(bias), x.data_ptr(), y.data_ptr()
    if packed.dtype == torch.uint8:
        for i in range(0, rows, MAX_ROWS):
            _lib.matvec_int4(px + 4 * i * K, w, s, b, py + 4 * i * n, min(MAX_ROWS, rows - i), n, K, group, threads)
        return y
    fn = _lib.matvec_bf16 if packed.dtype == torch.bfloat16 else _lib.matvec_int8
    for i in range(0, rows, MAX_ROWS):
        fn(px + 4 * i * K, w, s, b, py + 4 * i * n, min(MAX_ROWS, rows - i), n, K, threads)
    return y


def decode_step(model: Model, ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                n_positions: int) -> torch.Tensor:
    """One token for each of M rows through the whole model described by `model` (see quant.CompiledStep):
    token ids and positions int64 (M,), caches bfloat16 (layers, >= M rows, kv_heads, max_len, head_dim) whose
    last three dimensions are contiguous; returns the logits (M, vocab) float32."""
    rows = ids.shape[0]
    max_len, head_dim = k_cache.shape[3], k_cache.shape[4]
    for c in (k_cache, v_cache):
        if (c.dtype != torch.bfloat16 or c.device.type != "cpu" or c.shape != k_cache.shape
                or c.stride() != k_cache.stride() or c.stride()[2:] != (max_len * head_dim, head_dim, 1)):
            raise ValueError("decode_step: the keys and values must be bfloat16 CPU tensors of the same shape and "
                             "layout, contiguous in their last 3 dimensions")
    if (k_cache.shape[0] != model.n_layers or k_cache.shape[1] < rows or k_cache.shape[2] != model.n_kv_heads
            or head_dim != model.head_dim):
        raise ValueError(f"decode_step: a KV cache of shape {tuple(k_cache.shape)} does not fit {rows} rows of this "
                         f"model ({model.n_layers} layers, {model.n_kv_heads} key/value heads of {model.head_dim})")
    if ids.dtype != torch.int64 or pos.dtype != torch.int64 or ids.shape != (rows,) or pos.shape != (rows,) \
            or not (ids.is_contiguous() and pos.is_contiguous()):
        raise ValueError("decode_step: ids and pos must be contiguous int64 vectors of one entry per row")
    logits = torch.empty(rows, model.vocab, dtype=torch.float32)
    status = _lib.decode_step(ctypes.byref(model), ids.data_ptr(), pos.data_ptr(), rows, k_cache.data_ptr(),
                              v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), max_len, n_positions,
                              logits.data_ptr(), torch.get_num_threads())
    if status == 1:
        raise IndexError(f"a token id is outside the vocabulary [0, {model.vocab})")
    if status == 2:
        raise IndexError(f"a position is outside the KV cache ({max_len}) or the context ({n_positions})")
    return logits
