import contextlib
import random

import numpy as np
import pytest
import torch

from build_llm import get_device, set_seed
from build_llm.runtime import (ONE_THREAD_BELOW, TimedThreads, available_memory, check_fits, decoding_threads, get_dtype,
                               one_thread, set_cpu_threads, training_dtype)


def test_set_seed_makes_python_numpy_and_torch_repeat():
    set_seed(7)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    with pytest.raises(ValueError, match="seed=-1"):
        set_seed(-1)


def test_get_device():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert get_device().type == expected
    assert get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='gpu0' is invalid"):
        get_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            get_device("cuda")


def test_get_dtype():
    assert get_dtype("bf16") is torch.bfloat16 and get_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="dtype='int8' is invalid"):
        get_dtype("int8")


def test_one_thread_rule_for_training_and_decoding(monkeypatch):
    """One rule, ONE_THREAD_BELOW weights, for a training run (set_cpu_threads) and for each decoding
    step (decoding_threads); OMP_NUM_THREADS or another device leaves the count alone."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        set_cpu_threads(ONE_THREAD_BELOW - 1, "cpu", 3)
        assert torch.get_num_threads() == 1
        set_cpu_threads(ONE_THREAD_BELOW, "cpu", 3)
        assert torch.get_num_threads() == 3
        set_cpu_threads(ONE_THREAD_BELOW - 1, "meta", 2)
        assert torch.get_num_threads() == 3
        assert decoding_threads(ONE_THREAD_BELOW - 1, "cpu") is one_thread
        assert isinstance(decoding_threads(ONE_THREAD_BELOW, "cpu"), TimedThreads)  # 3 threads: the faster, timed
        # the compiled step's own pool waits for no busy core: every thread; a small model still on one
        assert decoding_threads(ONE_THREAD_BELOW, "cpu", compiled=True) is contextlib.nullcontext
        assert decoding_threads(ONE_THREAD_BELOW - 1, "cpu", compiled=True) is one_thread
        assert decoding_threads(ONE_THREAD_BELOW, "meta") is contextlib.nullcontext
        torch.set_num_threads(1)
        assert decoding_threads(ONE_THREAD_BELOW, "cpu") is contextlib.nullcontext  # nothing to choose between
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        set_cpu_threads(ONE_THREAD_BELOW - 1, "cpu", 2)
        assert torch.get_num_threads() == 3
        assert decoding_threads(ONE_THREAD_BELOW - 1, "cpu") is contextlib.nullcontext
    finally:
        torch.set_num_threads(threads)


def test_timed_threads_runs_each_step_on_the_count_that_has_been_faster(monkeypatch):
    """The first step (the prompt) on every thread, untimed; then each count once; then the faster one, and the
    other every `explore`-th step; the caller's count restored after every step."""
    seconds = {1: 1.0, 4: 3.0}  # a busy machine: one thread is faster
    clock = {"now": 0.0}
    monkeypatch.setattr("build_llm.runtime.time.perf_counter", lambda: clock["now"])
    saved = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        timed, used = TimedThreads(4, explore=5), []
        for step in range(16):
            if step == 8:
                seconds[4] = 0.1  # the machine went quiet: every thread is faster now
            with timed():
                n = torch.get_num_threads()
                used.append(n)
                clock["now"] += seconds[n] if step else 100.0  # the prompt: slow, and not counted
            assert torch.get_num_threads() == 4
        # the prompt; 1 and 4 tried; then the faster (1), but 4 at the 5th and 10th call; that one finds the machine
        # quiet (from step 8): 4 from then on, but 1 again at the 15th call
        assert used == [4, 1, 4, 1, 4, 1, 1, 1, 1, 4, 4, 4, 4, 4, 1, 4]
        assert timed.average[1] == 1.0
    finally:
        torch.set_num_threads(saved)


def test_check_fits_refuses_more_than_is_available():
    free = available_memory()
    if free is None:
        pytest.skip("no /proc/meminfo here")
    assert free > 0
    check_fits(1, "one byte")
    with pytest.raises(ValueError, match="a huge model needs about .* GiB of memory but"):
        check_fits(free * 4, "a huge model")


def test_a_gpu_is_checked_against_its_own_free_memory(monkeypatch):
    """CUDA paths with the device's answers mocked: mem_get_info's free bytes, not the host's."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 16 * 2**30))
    assert available_memory("cuda:0") == 3 * 2**30
    check_fits(2 * 2**30, "a model", "cuda:0")
    with pytest.raises(ValueError, match="a model needs about 4.0 GiB of memory but cuda:0 has 3.0 GiB available"):
        check_fits(4 * 2**30, "a model", "cuda:0")


def test_training_dtype_falls_back_to_float16_where_a_gpu_has_no_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    dtype, why = training_dtype("bfloat16", "cuda:0")
    assert dtype == "float16" and "compute capability 7.5" in why and "gradient scaler" in why
    assert training_dtype("bfloat16", "cpu") == ("bfloat16", "")  # the CPU autocasts to bfloat16
    assert training_dtype("float32", "cuda:0") == ("float32", "")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert training_dtype("bf16", "cuda:0") == ("bfloat16", "")
    assert training_dtype("float16", "cpu")[0] == "float16"


def test_cpu_has_bf16_reads_what_the_cpu_reports(tmp_path):
    from build_llm.runtime import cpu_has_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not cpu_has_bf16(info)
    info.write_text("flags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_bf16(info)
    info.write_text("Features\t: fp asimd bf16 i8mm\n")  # Arm
    assert cpu_has_bf16(info)
    assert cpu_has_bf16(tmp_path / "absent")  # unknown: measure
