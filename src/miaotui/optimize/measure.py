"""One candidate, measured: build it from the source, its quality on a split, its speed on this machine.

Speed is measured with the real engine (``Runner`` + ``generate_tokens``, the code ``miaotui generate``
runs, optionally with the compiled decode step) through the benchmark's ``Engine`` interface and timing
helpers, kept short so a search can afford one per candidate:

- decode: batch-1 decode tok/s = (N - 1) / (t(N new tokens) - t(1 new token)), N = 48, median of 3
  (``bench/latency.py``'s formula: prefill and the first token cancel out);
- prefill: prompt tok/s at 512 tokens (or the model's context, if shorter), median of 3;
- throughput: aggregate tok/s of 4 concurrent requests through the continuous-batching engine;
- memory: the bytes of weights a decode step reads (no timing: it is exact).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch

from miaotui.bench.engines import MiaotuiEngine, decode_bytes
from miaotui.bench.latency import timed
from miaotui.compress.recipe import Calibration, Context, run_recipe

OBJECTIVES = {
    # objective → (what is measured, unit, higher is better)
    "decode": ("batch-1 decode", "tok/s", True),
    "prefill": ("prefill at 512 tokens", "tok/s", True),
    "throughput": ("aggregate throughput, 4 concurrent requests", "tok/s", True),
    "memory": ("weight bytes read per decoded token", "MB", False),
}


@dataclasses.dataclass
class SpeedSettings:
    decode_tokens: int = 48
    prefill_tokens: int = 512
    concurrency: int = 4
    repeats: int = 3
    compile: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class LoadedEngine(MiaotuiEngine):
    """``MiaotuiEngine`` around a model already in memory (a candidate just built), prepared the same way."""

    def __init__(self, loaded, name: str, compile: bool = False):  # noqa: D107 — no load from disk here
        from miaotui.engine.prepare import prepare_for_inference
        from miaotui.engine.runner import Runner

        self.loaded = loaded
        prepare_for_inference(loaded.model)
        self.runner = Runner(loaded.model, compile=compile)
        self.name = f"miaotui {name}{' compiled' if compile else ''}"
        self.weight_bytes = decode_bytes(loaded.model)


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of the checkpoint's tensors (each storage once: a tied head and its embedding count once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def fresh_copy(source):
    """A deep copy of the source ``LoadedModel`` (model and config: steps change both), tokenizer shared."""
    return dataclasses.replace(source, model=copy.deepcopy(source.model), config=copy.deepcopy(source.config))


@dataclasses.dataclass
class Shared:
    """What every build reuses: calibration tokens (computed on first need) and the teacher (the source)."""

    calibration: Calibration
    source: Any  # the fused float LoadedModel, never modified
    calib_ids: torch.Tensor | None = None


def build(shared: Shared, steps: list[dict], name: str) -> tuple[Any, dict, list[dict], float]:
    """Run ``steps`` on a fresh copy of the source: (LoadedModel, module map, step records, seconds)."""
    t0 = time.perf_counter()
    loaded = fresh_copy(shared.source)
    ctx = Context(loaded, shared.calibration, progress=False, calib_tokens=shared.calib_ids,
                  teacher_model=shared.source)
    records = run_recipe(ctx, {"name": name, "steps": steps})
    shared.calib_ids = ctx.calib_tokens  # the first calibrated step computed them: the others reuse them
    return loaded, ctx.modules, records, time.perf_counter() - t0


def quality(loaded, reference) -> dict[str, float]:
    """Perplexity / KLD / top-1 of ``loaded`` against ``reference`` (a split's ``ReferenceLogits``)."""
    from miaotui.compress.quant.qlinear import prepare_quantized
    from miaotui.eval.evaluate import evaluate

    prepare_quantized(loaded.model)  # measure the kernels that will run
    r = evaluate(loaded, reference=reference).to_dict()
    keys = ("perplexity", "perplexity_stderr", "reference_perplexity", "kld_mean", "kld_median", "kld_p99",
            "kld_max", "top1_agreement", "tokens", "windows", "ctx")
    return {k: r[k] for k in keys if k in r}


def speed(loaded, name: str, objective: str, prompt, settings: SpeedSettings) -> dict[str, Any]:
    """The objective's figure for ``loaded`` (prepared for inference here): ``{"value", "unit", ...}``.
    ``prompt(n)`` → n token ids of real text."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    t0 = time.perf_counter()
    engine = LoadedEngine(loaded, name, settings.compile)
    out: dict[str, Any] = {"objective": objective, "unit": OBJECTIVES[objective][1],
                           "decode_bytes": engine.weight_bytes, "bytes": stored_bytes(loaded.model)}
    max_len = loaded.model.max_seq_len
    if objective == "decode":
        n = max(2, min(settings.decode_tokens, max_len - 40))
        ids = prompt(min(32, max_len // 4))
        engine.generate(ids, n)  # warm-up: allocation, kernel crossovers, the cache length this run needs
        t1 = timed(lambda: engine.generate(ids, 1), settings.repeats)
        tn = timed(lambda: engine.generate(ids, n), settings.repeats)
        out["value"] = (n - 1) / max(tn - t1, 1e-9)
        out["tokens"] = n
    elif objective == "prefill":
        n = min(settings.prefill_tokens, max_len - 1)
        ids = prompt(n)
        engine.prefill(ids)
        out["value"] = n / timed(lambda: engine.prefill(ids), settings.repeats)
        out["tokens"] = n
    elif objective == "throughput":
        from miaotui.bench.throughput import measure_throughput

        out["value"] = measure_throughput(engine, prompt, (settings.concurrency,),
                                          repeats=settings.repeats)[str(settings.concurrency)]
        out["concurrency"] = settings.concurrency
    else:
        out["value"] = engine.weight_bytes / 1e6
    out["compile_s"] = engine.compile_s
    out["seconds"] = time.perf_counter() - t0
    loaded.model.clear_cache()  # a saved checkpoint must not carry the benchmark's KV cache
    return out
