"""miaotui (秒推): fast LLM inference on CPU — engine, compression, evaluation, serving."""

from miaotui import allocator

allocator.setup()  # 2 MB pages for weights, freed activations kept for reuse (see allocator.py)

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
