"""Process-group set-up from the launcher's environment (torchrun, deepspeed, SLURM, or none).

Rank, world size and master address always come from the environment; nothing here knows which
launcher set them. A plain ``python -m pretrain`` becomes a world of one on a free local port
(without it DeepSpeed falls into MPI discovery and asks for mpi4py).
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.limits import raise_open_file_limit


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


DEFAULT_TIMEOUT_S = 1800.0  # dist.timeout_s: NCCL's own default (10 min) is shorter than a 7B checkpoint load


def launch_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment, before any process group exists."""
    _fill_env()
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def choose_accelerator(env: dict[str, str] | None = None, cuda_devices: int | None = None) -> str:
    """The DeepSpeed accelerator for this process, chosen from the hardware (and exported as DS_ACCELERATOR).

    A CPU accelerator while CUDA devices are visible is refused: a GPU job would silently train on
    the CPU with gloo (an exported ``DS_ACCELERATOR=cpu`` from a Makefile or a login shell is enough).
    ``LMFORGE_ACCELERATOR=cpu`` asks for the CPU by name and wins.
    """
    env = os.environ if env is None else env
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = env.get("LMFORGE_ACCELERATOR", "").strip().lower()
    if named and named not in ("cpu", "cuda"):
        raise LmforgeError(f"LMFORGE_ACCELERATOR={named}: expected cpu or cuda")
    if named == "cuda" and not cuda_devices:
        raise LmforgeError("LMFORGE_ACCELERATOR=cuda but no CUDA device is visible to this process; "
                           "check CUDA_VISIBLE_DEVICES / the job's --gpus")
    chosen = named or env.get("DS_ACCELERATOR") or ("cuda" if cuda_devices else "cpu")
    if chosen == "cpu" and cuda_devices and not named:
        raise LmforgeError(
            f"DS_ACCELERATOR=cpu but {cuda_devices} CUDA device(s) are visible: this job would train on the CPU. "
            "Unset DS_ACCELERATOR (the accelerator follows the hardware), or set LMFORGE_ACCELERATOR=cpu to "
            "train on the CPU on purpose"
        )
    env["DS_ACCELERATOR"] = chosen
    return chosen


def cuda_device_index(local_rank: int, visible: int, local_world_size: int | None = None) -> int:
    """The visible CUDA device of this local rank.

    One process per GPU with all of the node's GPUs visible: device ``local_rank``. Sites that give
    each task its own GPU (``--gpus-per-task=1``, ``SLURM_GPU_BIND``) make exactly one device visible
    to every process, whose index is 0 whatever the local rank.
    """
    if visible <= 0:
        raise LmforgeError("no CUDA device is visible to this process; check CUDA_VISIBLE_DEVICES / the job's --gpus")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise LmforgeError(
        f"local rank {local_rank} but only {visible} CUDA device(s) visible"
        + (f" for {local_world_size} processes on this node" if local_world_size else "")
        + ": start one process per GPU (torchrun --nproc_per_node, or --gpus-per-task=1)"
    )


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: gloo on CPU, nccl on CUDA.

    ``timeout_s`` bounds every collective (NCCL's watchdog aborts all ranks past it). Work that one
    rank does alone (a world-size conversion, an export) must not run while the others wait in a
    collective: see :func:`rank0_work`.
    """
    _fill_env()
    raise_open_file_limit()
    accelerator = choose_accelerator()
    # torch 2.13 warns on every ZeRO-3 collective about the *_tensor names; it is noise here.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*|.*reduce_scatter_tensor.*")
    import deepspeed

    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator == "cuda":
        index = cuda_device_index(local_rank, torch.cuda.device_count(),
                                  int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else None)
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
        backend = "nccl"
        enable_tf32(torch.cuda.get_device_capability(index))
    else:
        device = torch.device("cpu")
        backend = "gloo"
        _skip_shm_comm_build()
    timeout = timedelta(seconds=timeout_s)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    return DistInfo(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size(), device)


def enable_tf32(capability: tuple[int, int]) -> bool:
    """fp32 matmuls and convolutions on TF32 tensor cores from Ampere (compute capability 8.0) on: ~8x the
    fp32 rate, with a 10-bit mantissa per product and fp32 accumulation (PyTorch's own default for
    convolutions; Megatron and torchtitan turn it on for matmuls too). bf16/fp16 runs are unaffected."""
    on = capability >= (8, 0)
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


def rank0_work(what: str, work: Callable[[], None], done: Callable[[], bool], marker_dir: str | Path, rank: int,
               poll_s: float = 0.5, progress_every_s: float = 60.0) -> None:
    """Rank 0 runs ``work()`` unless ``done()``; every other rank waits until ``done()``, polling files.

    No collective is involved, so no process-group timeout can abort the waiting ranks however long
    the work takes (a 7B universal conversion or export takes longer than NCCL's default 10 minutes).
    ``done()`` must test a completion marker the work writes last, on a filesystem all ranks see
    (the run directory). If rank 0 fails it leaves ``.<what>.failed`` with its error, and the
    waiting ranks raise it; rank 1 prints a progress line while it waits.
    """
    failed = Path(marker_dir) / f".{'_'.join(what.split())[:60]}.failed"
    if rank == 0:
        if done():
            return
        failed.unlink(missing_ok=True)
        try:
            work()
        except BaseException as e:
            Path(marker_dir).mkdir(parents=True, exist_ok=True)
            failed.write_text(" ".join(f"{type(e).__name__}: {e}".split()) + "\n")
            raise
        if not done():
            raise LmforgeError(f"{what}: finished without its completion marker in {marker_dir}")
        return
    baseline = _mtime(failed)  # a marker left by an earlier attempt is not this attempt's failure
    t0 = last = time.monotonic()
    while not done():
        if (m := _mtime(failed)) is not None and m != baseline:
            raise LmforgeError(f"rank 0 failed {what}: {failed.read_text().strip()}")
        if rank == 1 and time.monotonic() - last >= progress_every_s:
            last = time.monotonic()
            print(f"rank 1: waiting for rank 0 ({what}), {last - t0:.0f}s so far", flush=True)
        time.sleep(poll_s)


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return None


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


def shutdown(ok: bool = True) -> None:
    """Destroy the process group (avoids 'terminate called without an active exception' at exit).

    Only after a clean run: after an exception the other ranks may be inside a per-step collective,
    which a barrier here could pair with (the job then hangs until a watchdog). A failing rank
    leaves at once; its peers' next collective fails and the launcher stops the job.
    """
    if ok and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
