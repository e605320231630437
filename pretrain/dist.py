"""Process-group set-up from the launcher's environment (torchrun, deepspeed, SLURM, or none).

Rank, world size and master address always come from the environment; nothing here knows which
launcher set them. A plain ``python -m pretrain`` becomes a world of one on a free local port
(without it DeepSpeed falls into MPI discovery and asks for mpi4py).
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_env() -> None:
    """torchrun sets RANK/WORLD_SIZE; under bare srun take SLURM's; otherwise a world of one."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: gloo on CPU, nccl on CUDA."""
    _fill_env()
    # torch 2.13 warns on every ZeRO-3 collective about the *_tensor names; it is noise here.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*|.*reduce_scatter_tensor.*")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    if acc.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        _skip_shm_comm_build()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    deepspeed.init_distributed(dist_backend=backend)
    return DistInfo(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size(), device)


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory comm op.

    DeepSpeed builds ``deepspeed_shm_comm`` in every process group it creates on CPU (70-110 s of C++
    on first use, and it needs a compiler), but only ``inference_all_reduce`` (tensor-parallel
    inference) ever calls it; training collectives go through torch.distributed (gloo) either way.
    Marking the op unavailable is DeepSpeed's own fallback for platforms without it.
    ``LMFORGE_DS_SHM_COMM=1`` keeps DeepSpeed's default.
    """
    if os.environ.get("LMFORGE_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def shutdown() -> None:
    """Destroy the process group (avoids 'terminate called without an active exception' at exit)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
