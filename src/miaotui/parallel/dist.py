"""torch.distributed from torchrun's environment: init, rank/world helpers, rank-0-only printing.

Everything here is a no-op in a plain process (not launched by torchrun): rank 0 of a world of 1, so
library code can call these helpers unconditionally.

    torchrun --nproc-per-node 2 -m miaotui generate "Hello"      # RANK, WORLD_SIZE, MASTER_ADDR set
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# Followers block in a broadcast until rank 0 has work; a server may idle for hours, so the default
# 30-minute collective timeout would kill them. A dead peer still fails fast (its sockets close).
DEFAULT_TIMEOUT_S = float(os.environ.get("MIAOTUI_DIST_TIMEOUT_S", 7 * 24 * 3600))


def launched() -> bool:
    """True when torchrun (or another launcher with the same env contract) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group torchrun described (once); False (and nothing done) when not launched.

    The backend is gloo on CPU and NCCL when CUDA is available (each rank then takes GPU ``LOCAL_RANK``).
    """
    if initialized():
        return True
    if not launched():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S))
    return True


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if initialized() else 0


def is_rank0() -> bool:
    return rank() == 0


def device() -> torch.device:
    """Where this rank's tensors live: its GPU under NCCL, else the CPU."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (the others would repeat every line)."""
    if is_rank0():
        print(*args, **kwargs)


def barrier() -> None:
    if initialized():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (recent torch warns at exit when a group was never destroyed)."""
    if initialized():
        dist.destroy_process_group()

