"""miaotui (秒推): fast LLM inference on CPU — engine, compression, evaluation, serving."""

import os

# Decode streams every weight from memory per token: on 2 MB pages (PyTorch's allocator madvises blocks of
# 2 MB and more when this is set) the hardware prefetchers are not stopped at every 4 KB page boundary and
# TLB misses drop: fp32 decode +8 % (median of 7 process pairs), GEMV bandwidth +4-8 % in one process
# (docs/BENCHMARKS.md). PyTorch reads it at its first allocation, so it only takes effect when miaotui is
# imported before torch (the CLI always is); an explicit setting, e.g. 0, is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from miaotui.config import GenerationStats, SamplingParams
from miaotui.errors import MiaotuiError, ModelLoadError, PromptTooLongError

__version__ = "0.1.0"
__all__ = ["LLM", "load", "SamplingParams", "GenerationStats", "MiaotuiError", "ModelLoadError",
           "PromptTooLongError", "__version__"]


def __getattr__(name: str):
    # heavy imports (torch, transformers) only when the API is actually used
    if name == "LLM":
        from miaotui.llm import LLM

        return LLM
    if name == "load":
        from miaotui.loading import load

        return load
    raise AttributeError(name)
