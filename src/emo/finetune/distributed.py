"""Data-parallel fine-tuning across the processes that ``torchrun`` starts (DDP).

Every process (rank) trains on its share of each mini-batch, and DDP averages the gradients.
Rank 0 alone validates, keeps the best epoch, writes the run directory and logs. At the end of
each training step it sends the weights of the best epoch to the other ranks, so every rank
starts the next step from the same model. Backend: NCCL on CUDA, gloo on the CPU.

NOTE: only the gloo path on the CPU has been run (tests start two processes with torchrun);
the NCCL path on GPUs has not.
"""

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks of a ``torchrun`` job; one rank when not started by it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, which ``torchrun`` sets for each process."""
        return cls(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that evaluates, writes files and logs."""
        return self.rank == 0

    def device_name(self, device: str) -> str:
        """Return ``device``, with ``auto`` and ``cuda`` pinned to this rank's GPU under DDP on CUDA."""
        if self.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def start(self, device: torch.device) -> None:
        """Join the process group (a no-op for a single process)."""
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    def stop(self) -> None:
        """Wait for every rank, then leave the process group."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Return ``model`` wrapped in DDP over its trainable parameters, or unchanged for one process.

        DDP records which parameters train when it is built, so each training step wraps anew.
        """
        if not self.enabled:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """Return whether ``flag`` is true on any rank."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Return the element-wise sum of ``values`` over all ranks."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def share_model(self, model: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every other rank's ``model``."""
        if not self.enabled:
            return
        for tensor in model.state_dict().values():
            # A contiguous buffer works with every backend, whatever the memory format of the tensor.
            buffer = tensor if tensor.is_contiguous() else tensor.contiguous()
            dist.broadcast(buffer, src=0)
            if buffer is not tensor:
                tensor.copy_(buffer)


class ShardedBatchSampler(Sampler[list[int]]):
    """Each rank's share of every mini-batch of ``batches``: indices ``rank``, ``rank + world_size``, ...

    Every rank draws the same mini-batches (same sampler seed), so the shares never overlap
    and every rank runs the same number of batches, as DDP requires.
    """

    def __init__(self, batches: Sampler[list[int]], distributed: Distributed):
        self.batches = batches
        self.distributed = distributed

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.distributed.rank::self.distributed.world_size]

    def __len__(self) -> int:
        return len(self.batches)


def silence_other_ranks() -> None:
    """Turn off logging, progress bars and printing in every rank but 0 of a ``torchrun`` job."""
    if Distributed.from_environment().is_main:
        return
    logging.disable(logging.CRITICAL)
    # tqdm and click write to sys.stderr and sys.stdout as they are when they write.
    sys.stdout = sys.stderr = open(os.devnull, "w", encoding="utf-8")
