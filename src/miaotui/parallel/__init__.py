"""Tensor parallel over torch.distributed, launched by torchrun, on one machine or several.

- ``dist``: process group from torchrun's environment (gloo on CPU, NCCL on CUDA), rank helpers, ``print0``.
- ``tp``: ``apply_tp(model, rank, world)`` shards a model by the plan its file declares.
- ``worker``: rank 0 leads (``TPLeader`` broadcasts each forward), followers replay (``TPWorkerLoop``).
- ``launch``: ``load_sharded``, ``lead``, ``follow``, what the CLI verbs call.
"""

from miaotui.parallel.tp import TPError, apply_tp, weight_bytes

__all__ = ["TPError", "apply_tp", "weight_bytes"]
