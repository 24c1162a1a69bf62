"""The engines a benchmark compares, behind one small interface so every one is timed the same way.

Each engine runs greedy, EOS ignored, with the prompt cache emptied before every call (no prefix reuse).
"""

from __future__ import annotations

from pathlib import Path

import torch

from miaotui.bench.engine_base import Engine


def decode_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter once, but of an untied input embedding
    only the one row it looks up (a tied one is read whole as the output projection)."""
    # persistent tensors only (a quantized linear's weights are buffers), each storage once (tied weights)
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}.values()
    total = sum(t.numel() * t.element_size() for t in tensors)
    embed = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    head = getattr(model.lm_head, "weight", None)
    if embed is not None and embed.weight is not head:
        total -= embed.weight.numel() * embed.weight.element_size()
    return total


class MiaotuiEngine(Engine):
    def __init__(self, model: str | None, dtype: str, compile: bool):
        from miaotui.engine.prepare import prepare_for_inference
        from miaotui.engine.runner import Runner
        from miaotui.kernels.decode_plan import decode_path
        from miaotui.loading import load

        self.loaded = load(model, dtype)
        prepare_for_inference(self.loaded.model)
        self.runner = Runner(self.loaded.model, compile=compile)
        what = self.loaded.manifest["recipe"].get("name", "compressed") if self.loaded.manifest else dtype
        path = decode_path(self.loaded.model, compile)
        self.name = f"miaotui {what}" + ("" if path == "eager" else f" {path}")
        self.weight_bytes = decode_bytes(self.loaded.model)

    @property
    def compile_s(self) -> float:
        return self.runner.compile_s

    def prefill(self, ids):
        from miaotui.engine.generate import ensure_cache

        ensure_cache(self.loaded.model, len(ids) + 1)
        with torch.inference_mode():
            self.runner.prefill(torch.tensor([ids])).argmax(-1).item()

    def generate(self, ids, n):
        from miaotui.config import SamplingParams
        from miaotui.engine.generate import generate_tokens

        for _ in generate_tokens(self.runner, ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)):
            pass

    def batch_generate(self, prompts, max_new):
        from miaotui.config import SamplingParams
        from miaotui.engine.llm_engine import LLMEngine, offline_config

        # sized as LLM.generate sizes a list of prompts; prefix caching off: the benchmark prompts share their
        # opening text, and reuse is not throughput
        config = offline_config(self.loaded.model, [len(p) + n for p, n in zip(prompts, max_new)],
                                enable_prefix_caching=False)
        engine = LLMEngine(self.loaded, config=config)
        engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_new])


class HFEngine(Engine):
    """transformers' own model class and ``generate`` on the same weights miaotui loads."""

    def __init__(self, model: str | None, dtype: str):
        import transformers

        from miaotui.loading import default_model_path, resolve_dtype

        path = Path(model) if model else default_model_path()
        torch_dtype = resolve_dtype(dtype)
        if path.is_dir():
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
        else:
            from miaotui.loading.gguf import load_gguf

            cfg, sd = load_gguf(path, torch_dtype)
            config = transformers.AutoConfig.for_model(**cfg)
            # built on the CPU (not meta) so non-persistent buffers such as rotary tables are real
            self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:
                raise ValueError(f"weights do not fit transformers' model: {missing[:3]} {unexpected[:3]}")
            self.model.tie_weights()
        self.model.eval()
        self.model.generation_config.pad_token_id = 0
        self.name = f"transformers {dtype}"
        self.weight_bytes = decode_bytes(self.model)

    def _run(self, ids, n):
        with torch.inference_mode():
            self.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def prefill(self, ids):
        self._run(ids, 1)

    def generate(self, ids, n):
        self._run(ids, n)

    def batch_generate(self, prompts, max_new):
        # static batching: left-padded, every row runs to the longest requested output
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        n = max(max_new)
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
