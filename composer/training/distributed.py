"""Data-parallel training of the carry-on over several processes, through accelerate.

Launched as `accelerate launch --multi_gpu --num_processes N -m composer train RECIPE
--from-cache` (or `torchrun --nproc-per-node N -m composer ...`), every process holds the
carry-on and the anchor's head and reads only its share of each step's batch from the shared
feature cache. Step s's global batch is the same pure function of (seed, s) as on one process;
rank r takes its rows r, r+N, ... Each rank's summed token loss is divided by the *global*
number of target tokens and the gradients are summed across ranks in one all-reduce, so the
update equals the one-process update for the same global batch up to float summation order.
Only rank 0 writes checkpoints and the mixture directory.

Without a launcher this is one process and every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_LAUNCHED = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch, mpirun) started several processes."""
    return any(int(os.environ.get(name, "1")) > 1 for name in _LAUNCHED)


@dataclass
class Ranks:
    """This process's place among the training processes, and the collectives training uses."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    state: Any = None  # accelerate's PartialState when launched

    @classmethod
    def current(cls) -> Ranks:
        """One process, or accelerate's state for a launched group (gloo on CPU, nccl on GPU)."""
        if not launched():
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, state.device, state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's part of `items`: every world-th one, from its rank on."""
        return items[self.rank :: self.world]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over every rank (the tensor itself on one process)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        out = tensor.detach().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks: one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()
