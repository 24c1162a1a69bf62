"""Loading a model under torchrun: each rank keeps only its shard; rank 0 leads, the others follow.

Used by the CLI verbs in three lines (``generate``; ``serve`` passes ``lead_loaded(...)`` to its app):

    if launch.is_follower():             # torchrun rank > 0: replay rank 0's forwards, print nothing
        return launch.follow(args.model, args.dtype, args.threads)
    llm = launch.lead(args.model, args.dtype) if launch.tp_active() else load_llm(args)
"""

from __future__ import annotations

import atexit
import gc
import os

import torch

from miaotui.parallel import dist
from miaotui.parallel.tp import UNEVEN_ENV, apply_tp
from miaotui.parallel.worker import TPLeader, TPWorkerLoop


def tp_active() -> bool:
    """Launched by torchrun with more than one rank (joins the process group on first call)."""
    return dist.init() and dist.world_size() > 1


def is_follower() -> bool:
    return tp_active() and dist.rank() != 0


def load_sharded(path=None, dtype: str = "fp32", vocab_parallel: bool = True, progress: bool = False,
                 uneven_heads: bool | None = None):
    """``loading.load`` then this rank's shard of every planned weight; the full tensors are dropped, so
    the weights this rank keeps are ~1/world of the model (replicated norms and biases aside).

    The full checkpoint is read first (transiently, once per rank): shard-wise reading is left to a
    loader that knows each format's name map before conversion."""
    from miaotui.loading import load

    dist.init()
    loaded = load(path, dtype, progress)
    if uneven_heads is None:  # the CLI's opt-in, the same on every rank because torchrun passes the env on
        uneven_heads = os.environ.get(UNEVEN_ENV, "0") == "1"
    apply_tp(loaded.model, dist.rank(), dist.world_size(), vocab_parallel=vocab_parallel, uneven_heads=uneven_heads)
    gc.collect()  # the replaced full weights are garbage now; give their memory back before the caches
    return loaded


def _threads(threads: int | None) -> None:
    # torchrun sets OMP_NUM_THREADS=1 per rank when it starts several; an explicit --threads wins
    if threads:
        torch.set_num_threads(threads)


def follow(path=None, dtype: str = "fp32", threads: int | None = None, vocab_parallel: bool = True) -> int:
    """A follower rank's whole life: load its shard, prepare it like rank 0, replay forwards until stopped."""
    from miaotui.engine.prepare import prepare_for_inference

    _threads(threads)
    loaded = load_sharded(path, dtype, vocab_parallel)
    prepare_for_inference(loaded.model)
    TPWorkerLoop(loaded.model).run()
    dist.destroy()
    return 0


def lead_loaded(path=None, dtype: str = "fp32", threads: int | None = None, vocab_parallel: bool = True,
                progress: bool = False):
    """Rank 0's shard (a ``LoadedModel``) with the leader hook installed: every forward of it, from any
    caller (``LLM``, ``LLMEngine.step`` in a server's engine thread), is mirrored on the followers. Hand it
    to ``LLM(loaded)`` or to the server (``create_app(cfg, loaded=...)``), which prepare it as usual."""
    _threads(threads)
    loaded = load_sharded(path, dtype, vocab_parallel, progress)
    atexit.register(dist.destroy)  # atexit runs last-in first-out: the leader's stop() comes first
    loaded.tp_leader = TPLeader(loaded.model)
    return loaded


def lead(path=None, dtype: str = "fp32", threads: int | None = None, vocab_parallel: bool = True,
         progress: bool = False):
    """Rank 0: an ``LLM`` over its shard. Decode is not compiled (the broadcast hook and the collectives
    would break the graph)."""
    from miaotui.llm import LLM

    return LLM(lead_loaded(path, dtype, threads, vocab_parallel, progress), compile=False)
