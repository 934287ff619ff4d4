"""torchrun: joining the process group, rank helpers, and wrapping a model for DDP or FSDP.

A plain `python` run is one process with `Dist()` (rank 0 of 1): every helper here is then a no-op,
so the trainer calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from build_llm.errors import UsageError
from build_llm.runtime import get_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj` (any picklable value), on every process."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """fn() run on the main process only, its result given to every process; a UsageError it
        raises is raised on every process (so that none waits for a collective the others left)."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UsageError as e:
                error = str(e)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise UsageError(error)
        return result


def init_distributed(device_name: str, log: Callable[[str], None] | None = None) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA.
    Each process takes the GPU of its local rank: --device cuda:N names no one GPU for them all, so
    it means "cuda", and the main process says so through `log`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), get_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device_name!r} is not available here: no CUDA device; use cpu")
    if device_name.startswith("cuda:") and rank == 0 and log is not None:
        log(f"--device {device_name} under torchrun: each process uses the GPU of its local rank "
            f"(cuda:0 to cuda:{int(os.environ.get('LOCAL_WORLD_SIZE', world)) - 1}); give --device cuda")
    use_cuda = (device_name == "auto" or device_name.startswith("cuda")) and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank), device


def close_distributed(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def fsdp_options(dtype: str) -> dict[str, Any]:
    """fully_shard's keyword arguments for training in `dtype`: under bfloat16 autocast, parameters
    gathered in bfloat16 (half the all-gather) and gradients reduced in float32 (their sum keeps its
    precision); the float32 master weights and optimizer stay sharded."""
    if dtype != "bfloat16":
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy  # heavy: seconds to import, and only --fsdp needs it

    return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}


def wrap_model(core: nn.Module, d: Dist, device: torch.device, *, fsdp: bool = False,
               compile: bool = False, dtype: str = "float32") -> nn.Module:
    """The module the loop calls: `core` itself, DDP around it, or (with `fsdp`) `core` sharded in
    place, block by block (FSDP2's fully_shard, mixed precision per fsdp_options); then
    torch.compile if asked. The optimizer and checkpoints keep using `core`."""
    model: nn.Module = core
    if fsdp:
        if not d.active:
            raise UsageError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
        if dtype == "float16":
            raise UsageError("--fsdp with float16 (a GPU without bfloat16): the gradient scaler is not supported "
                             "on sharded parameters here; use --dtype float32, or DDP (drop --fsdp)")
        from torch.distributed.fsdp import fully_shard  # heavy: seconds to import, and only --fsdp needs it

        options = fsdp_options(dtype)
        for block in core.trf_blocks:
            fully_shard(block, **options)
        fully_shard(core, **options)
    elif d.active:
        model = DDP(core, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return model


def full_state_options(fsdp: bool):
    """torch.distributed.checkpoint options for whole (unsharded) state dicts, gathered to the CPU
    under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions  # heavy: seconds to import

    return StateDictOptions(full_state_dict=True, cpu_offload=fsdp)
