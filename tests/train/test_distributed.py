"""build_llm.train.distributed without a GPU: the CUDA paths with the device's answers mocked."""

from __future__ import annotations

import pytest
import torch

import build_llm.train.distributed as dist_mod
from build_llm.train.distributed import Dist, fsdp_options, init_distributed


@pytest.fixture
def two_gpu_torchrun(monkeypatch):
    """Process `rank` of a 2-process torchrun on a machine with 2 GPUs, nothing initialised for real."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: True)

    def launch(rank: int) -> list:
        for key, value in (("WORLD_SIZE", 2), ("RANK", rank), ("LOCAL_RANK", rank), ("LOCAL_WORLD_SIZE", 2)):
            monkeypatch.setenv(key, str(value))
        return chosen
    return launch


@pytest.mark.parametrize("rank", [0, 1])
def test_cuda_n_under_torchrun_means_each_process_its_local_gpu(two_gpu_torchrun, rank):
    chosen, lines = two_gpu_torchrun(rank), []
    d, device = init_distributed("cuda:0", lines.append)
    assert (d.rank, d.world, d.local_rank) == (rank, 2, rank)
    assert device == torch.device("cuda", rank) and chosen == [device]  # not the CPU, not everyone on cuda:0
    if rank == 0:  # said once, by the main process
        assert len(lines) == 1 and "local rank" in lines[0] and "--device cuda" in lines[0]
    else:
        assert lines == []


def test_auto_and_cuda_under_torchrun_take_the_local_gpu(two_gpu_torchrun):
    two_gpu_torchrun(1)
    assert init_distributed("auto")[1] == torch.device("cuda", 1)
    assert init_distributed("cuda")[1] == torch.device("cuda", 1)


def test_fsdp_mixed_precision_gathers_bfloat16_and_reduces_float32():
    policy = fsdp_options("bfloat16")["mp_policy"]
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert fsdp_options("float32") == {}


def test_fsdp_refuses_float16():
    with pytest.raises(ValueError, match="--fsdp with float16"):
        dist_mod.wrap_model(torch.nn.Linear(2, 2), Dist(0, 2, 0), torch.device("cpu"), fsdp=True, dtype="float16")


def test_one_process_helpers_are_plain_calls():
    d = Dist()
    assert d.broadcast({"a": 1}) == {"a": 1} and d.from_main(lambda: 3) == 3
