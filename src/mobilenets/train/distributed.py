"""Data-parallel training under torchrun: the process group, sums across ranks, agreeing to stop.

NCCL with one GPU per process on CUDA, gloo on CPU.  Every rank runs the same
loop; collective calls here keep them in step, and rank 0 alone writes.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from .config import ConfigError, check_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool, device) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        return bool(self.all_sum([1.0 if flag else 0.0], device)[0]) if self.enabled else flag

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (just ``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def max_int(self, value: int, device) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def broadcast_from_main(self, tensors) -> None:
        """Overwrite ``tensors`` in place with rank 0's values."""
        if self.enabled:
            for t in tensors:
                torch.distributed.broadcast(t, src=0)

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def elastic_job() -> str | None:
    """The torchrun job this process belongs to (its rendezvous id), or None outside torchrun.

    torchrun restarts every worker of a job with the same id after a failure
    (``--max-restarts``), which is how a restarted run recognises its own folder.
    """
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


# torchrun's c10d rendezvous lends the workers its own store (TORCHELASTIC_USE_AGENT_STORE) and keeps it, with
# no per-attempt prefix, when it restarts them: restarted workers can read the dead attempt's addresses from it,
# dial a process that is gone, and fail; an agent then left with a restart waits (join_timeout, 600 s) for a
# partner that has exited (pytorch/pytorch#135712).  Here 3 of 5 two-node runs with a killed rank failed or hung
# that way, and 8 of 8 passed (63-105 s at load 15-24) with the store not shared: each round gets a new one.
STALE_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"


def restart_hazard(environ=os.environ) -> str | None:
    """Why torchrun may fail to bring this job back after a worker dies, or None where it will."""
    restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restarts < 1:
        return None
    return (f"torchrun shares its rendezvous store with the workers and keeps it across restarts, so restarted "
            f"workers can connect to the dead attempt's addresses and fail (pytorch/pytorch#135712); "
            f"for --max-restarts to work, start torchrun with {STALE_STORE_FIX} in its environment")


def init_distributed(device_name: str | None) -> tuple[Dist, torch.device]:
    """Read torchrun's environment and join the process group; returns (Dist, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    check_device(device_name)
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"process {rank} needs cuda:{device.index} but this machine has "
                              f"{torch.cuda.device_count()} GPU(s); start fewer processes per node")
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        hazard = restart_hazard()
        if hazard and rank == 0 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            warnings.warn(hazard, stacklevel=2)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device
