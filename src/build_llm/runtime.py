"""Where and how the model runs: seeding, device and dtype choice, the memory available, and how
many CPU threads a model gets (one rule for training and decoding)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from build_llm.errors import UsageError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def set_seed(seed: int = 42) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed={seed!r} is invalid; expected an integer >= 0")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(name: str | None = None) -> torch.device:
    """The named device, or the best available one: cuda, then mps, then cpu."""
    if name not in (None, "auto"):
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as e:
            raise UsageError(f"device={name!r} is invalid; expected auto, cpu, cuda, cuda:N or mps") from e
        if device.type not in ("cpu", "cuda", "mps"):
            raise UsageError(f"device={name!r} is not supported; expected auto, cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device={name!r} is not available here: no CUDA device; use cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device={name!r} is not available here: {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError(f"device={name!r} is not available here; use cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes a new allocation on `device` can use now: on CUDA the device's free memory
    (torch.cuda.mem_get_info), elsewhere the host's (Linux MemAvailable); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None  # mps shares the host's memory under rules of its own: no check
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def release_freed_memory() -> None:
    """Hand memory freed to the C allocator back to the system (glibc's malloc_trim; nothing elsewhere).
    glibc keeps freed blocks of up to 32 MB in its heap, where a model loaded part by part leaves each
    part's float32 tensors as holes; without this the process keeps tens of MB it no longer uses."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _trim = False
    if _trim:
        _trim(0)


_trim = None


def check_fits(nbytes: int, what: str, device: torch.device | str = "cpu") -> None:
    """Refuse (UsageError) before allocating `nbytes` on `device` when it has less available."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        where = f"{torch.device(device)} has" if torch.device(device).type == "cuda" else "the machine has"
        raise UsageError(f"{what} needs about {nbytes / 2**30:,.1f} GiB of memory but {where} {free / 2**30:,.1f} "
                         "GiB available; choose a smaller model")


def training_dtype(requested: str, device: torch.device | str) -> tuple[str, str]:
    """(the dtype training runs in, why): bfloat16 where the device has it; on a CUDA GPU without
    bfloat16 (before Ampere), float16 with a gradient scaler instead; float16 as asked."""
    device = torch.device(device)
    if requested in ("bfloat16", "bf16") and device.type == "cuda" and not _cuda_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        return "float16", (f"--dtype bfloat16: this GPU (compute capability {major}.{minor}) has no bfloat16; "
                           "training in float16 with a gradient scaler instead")
    if requested in ("float16", "fp16"):
        return "float16", "--dtype float16: autocast in float16, losses scaled against underflow (GradScaler)"
    return get_dtype_name(requested), ""


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU reports bfloat16 arithmetic (x86 AVX512_BF16 or AMX-BF16, Arm BF16). Without it
    PyTorch emulates bfloat16 autocast, several times slower than float32, so measuring it would only
    spend a time budget. Unknown (no cpuinfo): True, so the probe measures."""
    try:
        words = set(Path(cpuinfo).read_text(encoding="ascii", errors="replace").split())
    except OSError:
        return True
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def _cuda_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


def get_dtype_name(name: str) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[get_dtype(name)]


def get_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"dtype={name!r} is invalid; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device | str, dtype: str | torch.dtype = "float32"):
    """Mixed precision for the forward pass and loss: bf16 (or fp16) autocast on CUDA and CPU, where
    matrix products run in the low precision and reductions such as softmax and the loss stay fp32;
    a no-op for float32. On CPUs with bf16 instructions (AVX512-BF16, AMX) this is the big speed-up."""
    dtype = get_dtype(dtype) if isinstance(dtype, str) else dtype
    device_type = torch.device(device).type
    if dtype == torch.float32 or device_type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def configure_backends(device: torch.device | str) -> None:
    """Fast defaults for `device`: on CUDA, TF32 tensor cores for fp32 matrix products and
    convolutions (10 mantissa bits in the products, fp32 accumulation: the usual trade for training).
    Nothing changes on CPU, whose fp32 matmuls stay exact fp32."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move a CPU batch to `device`; to CUDA through pinned memory without blocking, so the copy
    overlaps the running step. On CPU the tensor is returned as it is."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@contextlib.contextmanager
def one_thread():
    """Run the enclosed CPU operations on one thread, then restore the count. For small operations (a few
    vectors the size of the vocabulary: one row's sampling) while other threads or processes keep cores
    busy: shared among threads, each waited for a busy core (measured 1.5 ms for a float64 copy of 50,257
    numbers that takes 58 us on one thread)."""
    saved = torch.get_num_threads()
    if saved != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if saved != 1:
            torch.set_num_threads(saved)


# A model below this many weights runs on one CPU thread, in training and in decoding: its matrix
# products are too small to share among threads, and other processes compete for the cores
# (measured with `build-llm bench`'s r-abc row, see the README's Speed).
ONE_THREAD_BELOW = 2_000_000


def wants_one_thread(weights: int, device: torch.device | str) -> bool:
    """Whether a model of `weights` weights on `device` should run on one CPU thread: on the CPU, below
    ONE_THREAD_BELOW, and OMP_NUM_THREADS not set (when it is, the user chose the count)."""
    return (torch.device(device).type == "cpu" and weights < ONE_THREAD_BELOW
            and "OMP_NUM_THREADS" not in os.environ)


def set_cpu_threads(weights: int, device: torch.device | str, threads: int | None = None) -> None:
    """Before training a model of `weights` weights: one CPU thread if it wants one (wants_one_thread),
    else `threads` (default: the count now). Nothing changes on another device or under OMP_NUM_THREADS."""
    if torch.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1 if wants_one_thread(weights, device) else torch.get_num_threads() if threads is None
                              else threads)


class TimedThreads:
    """A context for each decoding step that runs through PyTorch's modules (float32 weights, or a model the
    compiled step does not compute) on the CPU thread count that has been fastest: all of torch's threads or one,
    chosen by timing the steps as they run. (The compiled step needs none of this: see decoding_threads.)

    Each product of a step is an OpenMP region whose threads must all arrive before the step goes on. On a
    machine whose cores are busy with other work (other processes, or a server's own threads) a region waits
    for a thread that is not running, and a step on every thread can be many times slower than on one:
    measured on the development machine (2 cores, load average 10-15), int8 gpt2-small decoded at 2.2 tokens/s
    on 2 threads against 13 on one. On a quiet machine every thread is faster. So a step runs on the count
    whose running average of step times is lower, and every `explore`-th step on the other, so that a change
    in the machine's load is seen. The first step (the prompt) runs on every thread and is not timed. The count
    is restored after each step, so code between steps keeps its own."""

    def __init__(self, most: int, explore: int = 64) -> None:
        self.options = sorted({1, max(1, most)})
        self.explore, self.steps = explore, 0
        self.average: dict[int, float] = {}  # threads -> running average of a step's seconds

    def pick(self) -> int:
        self.steps += 1
        for n in self.options:
            if n not in self.average:
                return n
        best = min(self.options, key=self.average.__getitem__)
        if self.steps % self.explore == 0:
            return next((n for n in self.options if n != best), best)
        return best

    def record(self, threads: int, seconds: float) -> None:
        """The faster count's steps are averaged; another's (an exploring step) replaces its last time, so that
        a machine that went quiet is believed at once (and a wrong belief is undone by the next steps)."""
        old = self.average.get(threads)
        best = old is not None and threads == min(self.options, key=lambda n: self.average.get(n, float("inf")))
        self.average[threads] = 0.75 * old + 0.25 * seconds if best else seconds

    @contextlib.contextmanager
    def __call__(self):
        saved = torch.get_num_threads()
        first = self.steps == 0 and not self.average
        n = self.options[-1] if first else self.pick()
        if first:
            self.steps = 1
        if n != saved:
            torch.set_num_threads(n)
        start = time.perf_counter()
        try:
            yield
        finally:
            if not first:
                self.record(n, time.perf_counter() - start)
            if n != saved:
                torch.set_num_threads(saved)


def decoding_threads(weights: int, device: torch.device | str, compiled: bool = False):
    """The context for each decoding step of a model of `weights` weights on `device`: `one_thread` when
    it wants one (wants_one_thread), so that code between steps (and a caller holding a paused
    generator) keeps its own count; a no-op (every thread) when its steps are `compiled` (the C step of
    infer.kernels, whose thread pool never waits for a thread that is not running); on a CPU with more
    than one thread and OMP_NUM_THREADS not set, a `TimedThreads` (one per decoding loop); otherwise a
    no-op."""
    if wants_one_thread(weights, device):
        return one_thread
    if compiled:
        return contextlib.nullcontext
    if torch.device(device).type == "cpu" and torch.get_num_threads() > 1 and "OMP_NUM_THREADS" not in os.environ:
        return TimedThreads(torch.get_num_threads())
    return contextlib.nullcontext
