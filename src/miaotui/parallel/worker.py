"""Rank 0 leads, the other ranks follow: every forward rank 0 runs is replayed on every rank.

Rank 0 owns everything above the model (tokenizing, scheduling, sampling, HTTP). ``TPLeader`` hooks its
model: before each forward it broadcasts what the forward needs (input ids, positions, which KV cache
and, for the paged cache, the step's block tables). Followers run ``TPWorkerLoop``, which receives that and
runs the same forward on their shard; the row-parallel all-reduces inside pair up with rank 0's. Only rank
0 samples, and the sampled token reaches the followers as the next forward's input ids, so the ranks
cannot disagree about the output.

Nothing above the model changes: ``Runner``/``generate_tokens`` (static cache) and ``LLMEngine.step``
(paged cache, continuous batching; what a server drives) run on rank 0 as they do in one process.

Per step on the common path (a static-cache forward at an int position) that is two tiny broadcasts: a
fixed header of ints and the input ids. Anything else (paged steps, tensor positions) is pickled.
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect

import torch
import torch.distributed as dist
from torch import nn

from miaotui.models.base import KVCache

OP_STOP, OP_FORWARD, OP_OBJECT, OP_NOOP = 0, 1, 2, 3
_HEADER = 8  # op, B, T, start_pos, last_only, cache batch, cache length, (unused)


def _cache_desc(model) -> tuple:
    """What the followers must mirror of rank 0's cache: ("none",), ("static", B, L) or ("paged", blocks,
    block_size, step)."""
    cache = model.attention_layers()[0].kv_cache
    if cache is None:
        return ("none",)
    if isinstance(cache, KVCache):
        return ("static", cache.k.shape[0], cache.k.shape[2])
    from miaotui.engine.paged_cache import PagedKVCache

    if isinstance(cache, PagedKVCache):
        return ("paged", cache.num_blocks, cache.block_size, cache.step)
    raise TypeError(f"tensor parallel cannot mirror a {type(cache).__name__} on the other ranks")


def _to_device(obj, device: torch.device):
    """A step's metadata (dataclasses of tensors) on this rank's device: unpickled CUDA tensors land on the
    device index rank 0 used, which under NCCL is another rank's GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, list):
        return [_to_device(x, device) for x in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


class TPLeader:
    """Installed on rank 0's model: broadcasts every forward's inputs to the followers.

    ``stop()`` (also run at exit) releases the followers; ``ping()`` is a no-op step a server may send
    while idle, so a follower's wait never reaches the collective timeout.
    """

    def __init__(self, model: nn.Module, group=None):
        self.model, self.group, self.stopped = model, group, False
        self.device = next(model.parameters()).device
        self._sig = inspect.signature(model.forward)
        self._handle = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        atexit.register(self.stop)

    def _header(self, *ints: int) -> None:
        h = torch.zeros(_HEADER, dtype=torch.long, device=self.device)
        h[:len(ints)] = torch.tensor(ints, dtype=torch.long)
        dist.broadcast(h, src=0, group=self.group)

    def _before_forward(self, module, args, kwargs):
        a = self._sig.bind(*args, **kwargs).arguments
        ids, start = a["input_ids"], a.get("start_pos", 0)
        desc = _cache_desc(self.model)
        if desc[0] != "paged" and isinstance(start, int) and a.get("logit_rows") is None:
            b, t = ids.shape
            cache_b, cache_len = desc[1:] if desc[0] == "static" else (0, 0)
            self._header(OP_FORWARD, b, t, start, int(bool(a.get("last_only", False))), cache_b, cache_len)
            dist.broadcast(ids.contiguous(), src=0, group=self.group)
        else:  # general path: the cache description and the call's arguments, pickled
            self._header(OP_OBJECT)
            dist.broadcast_object_list([desc, dict(a)], src=0, group=self.group, device=self.device)
        return None

    def ping(self) -> None:
        if not self.stopped:
            self._header(OP_NOOP)

    def stop(self) -> None:
        """Tell the followers to leave their loop (idempotent)."""
        if self.stopped or not dist.is_initialized():
            return
        self.stopped = True
        self._handle.remove()
        self._header(OP_STOP)


class TPWorkerLoop:
    """Run on ranks > 0: replay rank 0's forwards on this rank's shard until rank 0 stops.

        loaded = load_sharded(path, dtype)           # this rank's shard
        prepare_for_inference(loaded.model)          # the same preparation rank 0 does
        TPWorkerLoop(loaded.model).run()
    """

    def __init__(self, model: nn.Module, group=None):
        self.model, self.group = model, group
        self.device = next(model.parameters()).device
        self.steps = 0
        self._pool = None  # the paged KV pool mirroring rank 0's engine

    @torch.inference_mode()
    def run(self) -> int:
        """Returns the number of forwards run."""
        h = torch.empty(_HEADER, dtype=torch.long, device=self.device)
        while True:
            dist.broadcast(h, src=0, group=self.group)
            op, b, t, start, last_only, cache_b, cache_len, _ = h.tolist()
            if op == OP_STOP:
                return self.steps
            if op == OP_NOOP:
                continue
            if op == OP_FORWARD:
                ids = torch.empty(b, t, dtype=torch.long, device=self.device)
                dist.broadcast(ids, src=0, group=self.group)
                self._mirror_static(cache_b, cache_len)
                self.model(ids, start, last_only=bool(last_only))
            elif op == OP_OBJECT:
                box = [None, None]
                dist.broadcast_object_list(box, src=0, group=self.group, device=self.device)
                desc, call = box
                self._run_object(desc, call)
            else:
                raise RuntimeError(f"tensor parallel: unknown op {op} from rank 0")
            self.steps += 1

    def _mirror_static(self, batch: int, length: int) -> None:
        """Give this rank a static cache of rank 0's shape (a new one exactly when rank 0 made one)."""
        if length == 0:
            self.model.clear_cache()
            return
        cache = self.model.attention_layers()[0].kv_cache
        if not isinstance(cache, KVCache) or cache.k.shape[0] != batch or cache.k.shape[2] != length:
            self.model.setup_cache(batch, length)

    def _run_object(self, desc: tuple, call: dict) -> None:
        call = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
        if desc[0] != "paged":
            self._mirror_static(*desc[1:]) if desc[0] == "static" else self.model.clear_cache()
            self.model(**call)
            return
        from miaotui.engine.paged_cache import PagedKVPool

        _, blocks, block_size, step = desc
        step = _to_device(step, self.device)
        if self._pool is None or (self._pool.num_blocks, self._pool.block_size) != (blocks, block_size):
            self._pool = None  # free the old pool before allocating the new one
            self._pool = PagedKVPool(self.model, blocks, block_size)
        with self._pool.bound(self.model, step):
            self.model(**call)
