"""llama.cpp as a benchmark peer, through llama-cpp-python (the `peers` extra); no torch in this process."""

from __future__ import annotations

from pathlib import Path

from miaotui.bench.engine_base import Engine
from miaotui.defaults import default_model_path


class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python, on the GGUF file itself (its own quantized kernels)."""

    def __init__(self, model: str | None, threads: int):
        from llama_cpp import Llama

        path = Path(model) if model else default_model_path()
        if path.is_dir():
            raise ValueError("llama.cpp needs a GGUF file")
        self.llm = Llama(str(path), n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        self.name = f"llama.cpp {path.stem.rsplit('.', 1)[-1]}"  # the quant type from the file name
        self.weight_bytes = path.stat().st_size

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)

    def generate(self, ids, n):
        self.llm.reset()
        for i, _ in enumerate(self.llm.generate(ids, top_k=1, reset=True)):
            if i + 1 == n:
                break
