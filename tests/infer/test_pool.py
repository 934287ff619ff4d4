"""The kernels' thread pool (kernels.c, `share`): the same bits on any count of threads, a region that does not wait
for a thread that is not running, workers started once and joined, a forked child that decodes."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from build_llm import GPTConfig, GPTModel
from build_llm.attention import KVCache
from build_llm.infer import kernels
from build_llm.infer.quant import CompiledStep, prepare_for_decoding, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the C kernels need Linux x86-64 and a C compiler")

LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, n_kv_heads=2)


class Threads:
    """torch's thread count (which the kernels are given) set for a block, restored after."""

    def __init__(self, n: int) -> None:
        self.n, self.saved = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def pool_threads() -> int:
    """The pool's threads running in this process, by their name."""
    n = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            n += (task / "comm").read_text().strip() == "build-llm-pool"
        except OSError:  # a thread that ended while the directory was read
            pass
    return n


def step_model(dtype: str, **kw) -> GPTModel:
    """A model whose products, attention (8 rows of 24 positions) and activation are each large enough to be shared."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt2-small", **{"vocab_size": 600, "context_length": 32, "emb_dim": 512,
                                                 "n_heads": 8, "n_layers": 2, **kw})
    model = prepare_for_decoding(GPTModel(cfg).eval(), dtype)
    assert isinstance(model.decode_step, CompiledStep)
    return model


def prefilled(model: GPTModel, rows: int = 8) -> tuple[KVCache, torch.Tensor]:
    """The cache after a 16-token prompt on `rows` rows (through PyTorch, on one thread), and 8 steps' tokens."""
    gen = torch.Generator().manual_seed(1)
    cache = model.new_cache(rows)
    with torch.inference_mode(), Threads(1):
        model(torch.randint(0, 600, (rows, 16), generator=gen), cache=cache)
    return cache, torch.randint(0, 600, (8, rows, 1), generator=gen)


def decode(model: GPTModel, threads: int, steps: int = 8, start=None, copy: bool = True) -> tuple[list, KVCache]:
    """Logits of `steps` compiled steps on `threads` threads after `start` (prefilled's; a copy of its cache unless
    `copy` is False), and the cache."""
    cache, ids = start or prefilled(model)
    if copy:
        cache = KVCache.over(cache.k.clone(), cache.v.clone(), cache.pos)
    with torch.inference_mode(), Threads(threads):
        return [model(t, cache=cache) for t in ids[:steps]], cache


@pytest.mark.parametrize("rows", [1, 5])
def test_every_product_gives_the_same_bits_on_1_2_and_3_threads(rows):
    g = torch.Generator().manual_seed(0)
    n, k = 1001, 768  # 1001 rows: a last block of 1 row, and chunks that do not divide the blocks
    x, w, bias = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    q8, s8 = quantize_int8(w)
    q4, s4 = quantize_int4(w, 64)
    weights = {"bfloat16": (kernels.pack(w.to(torch.bfloat16)), None, 0), "int8": (kernels.pack(q8), s8, 0),
               "int4": (kernels.pack_int4(q4, 64), s4, 64)}
    for name, (packed, scale, group) in weights.items():
        with Threads(1):
            alone = kernels.matvec(x, packed, n, scale, bias, group)
        for threads in (2, 3):
            before = kernels.pool_stats()
            with Threads(threads):
                shared = kernels.matvec(x, packed, n, scale, bias, group)
            after = kernels.pool_stats()
            assert torch.equal(shared, alone), (name, threads)
            assert after["regions"] > before["regions"] and after["workers"] >= threads - 1  # the pool computed it


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_the_compiled_step_gives_the_same_bits_on_1_2_and_3_threads(dtype, shape):
    model = step_model(dtype, **(LLAMA if shape == "llama" else {}))
    start = prefilled(model)
    alone, cache = decode(model, 1, start=start)
    for threads in (2, 3):
        before = kernels.pool_stats()
        shared, shared_cache = decode(model, threads, start=start)
        assert kernels.pool_stats()["regions"] > before["regions"]  # products, attention, activation: shared
        assert all(torch.equal(a, b) for a, b in zip(alone, shared)), threads
        assert torch.equal(cache.k, shared_cache.k) and torch.equal(cache.v, shared_cache.v)


def test_a_region_does_not_wait_for_a_worker_that_is_not_running():
    """Worker 1 held before it claims anything (as a thread whose core is busy elsewhere): a 2-thread step still
    finishes, every chunk computed by the caller, and the logits are the 1-thread ones. An OpenMP region would wait
    for it at its barrier for as long as it is held (here: until the test gives up)."""
    model = step_model("int8")
    start = prefilled(model)
    alone, _ = decode(model, 1, steps=2, start=start)
    kernels._lib.kernels_pool_shutdown()  # worker 1 alone from here (a worker 2 would compute chunks)
    before, result = kernels.pool_stats(), {}
    kernels._lib.kernels_pool_hold(1)
    try:
        runner = threading.Thread(target=lambda: result.update(out=decode(model, 2, steps=2, start=start)[0]))
        runner.start()
        runner.join(timeout=300)  # ctypes lets go of the GIL: a stalled step cannot stall this thread
        assert not runner.is_alive(), "the step waited for the held worker"
    finally:
        kernels._lib.kernels_pool_hold(0)
        runner.join()
    after = kernels.pool_stats()
    assert after["chunks_by_workers"] == before["chunks_by_workers"]  # worker 1 (the only one asked) did nothing
    assert after["chunks_by_caller"] > before["chunks_by_caller"] and after["regions"] > before["regions"]
    assert all(torch.equal(a, b) for a, b in zip(alone, result["out"]))


def test_workers_start_once_for_the_count_asked_and_are_joined():
    model = step_model("int8")
    start = prefilled(model)
    kernels._lib.kernels_pool_shutdown()
    assert kernels.pool_stats()["workers"] == 0 and pool_threads() == 0
    decode(model, 1, steps=1, start=start)
    assert pool_threads() == 0  # one thread starts no worker
    decode(model, 3, steps=1, start=start)
    tasks = {t.name for t in Path("/proc/self/task").iterdir() if (t / "comm").read_text().strip() == "build-llm-pool"}
    assert kernels.pool_stats()["workers"] == 2 and len(tasks) == 2
    decode(model, 2, steps=2, start=start)  # fewer asked: the same workers, none started
    assert tasks == {t.name for t in Path("/proc/self/task").iterdir()
                     if (t / "comm").read_text().strip() == "build-llm-pool"}
    kernels._lib.kernels_pool_shutdown()
    assert kernels.pool_stats()["workers"] == 0 and pool_threads() == 0


def test_a_forked_child_decodes_with_a_pool_of_its_own():
    """fork copies only the forking thread: the child must not wait for workers that do not exist in it. (The child
    runs no PyTorch operation large enough for OpenMP, whose own threads a forked child waits for forever.)"""
    model = step_model("int4")
    start = prefilled(model)
    alone, _ = decode(model, 1, steps=3, start=start)
    decode(model, 2, steps=1, start=start)
    assert kernels.pool_stats()["workers"] >= 1
    pid = os.fork()
    if pid == 0:  # the child: a decode on 2 threads, the same bits, then out without running the parent's cleanup
        ok = False
        try:
            ok = all(torch.equal(a, b) for a, b in zip(alone, decode(model, 2, steps=3, start=start, copy=False)[0]))
            ok = ok and kernels.pool_stats()["workers"] >= 1
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 300
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish its decoding step")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_a_process_exits_cleanly_with_its_workers_running():
    script = ("import torch; from build_llm.infer import kernels; assert kernels.available()\n"
              "x, w = torch.randn(1, 768), kernels.pack(torch.randn(1024, 768).to(torch.bfloat16))\n"
              "torch.set_num_threads(3); kernels.matvec(x, w, 1024)\n"
              "assert kernels.pool_stats()['workers'] == 2; print('decoded')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0 and done.stdout == "decoded\n", done.stderr
