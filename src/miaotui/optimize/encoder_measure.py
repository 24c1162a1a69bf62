"""One encoder candidate, measured: built from the source, its embeddings against the source's on a split of
paragraphs, its speed with the real encoder engine (``Encoder``: packed batches, length-sorted, the kernels
a checkpoint loads with).

- quality: mean / min cosine of each paragraph's embedding to the source's and the Spearman correlation of
  the two pairwise-similarity matrices (``eval/embeddings.py``), on the search split;
- throughput: texts/s encoding the search split at batch 32 (the quality pass is the warm-up), median of
  ``repeats``;
- latency: ms per text encoding the first ``single_texts`` paragraphs one at a time, median of ``repeats``;
- memory: the bytes of the stored weights (exact, no timing).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch

from miaotui.compress.recipe import Calibration, Context, run_recipe
from miaotui.optimize.measure import stored_bytes

OBJECTIVES = {
    # objective → (what is measured, unit, higher is better); the first is the encoders' default
    "throughput": ("texts/s at batch 32", "texts/s", True),
    "latency": ("single-input latency", "ms", False),
    "memory": ("weight bytes", "MB", False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass
class EncoderSpeedSettings:
    batch: int = 32
    single_texts: int = 8
    repeats: int = 3

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class EncoderShared:
    """What every build reuses: the calibration settings and the source (fused, fp32, never modified; also
    distillation's teacher)."""

    calibration: Calibration
    source: Any  # LoadedEncoder


def build_encoder(shared: EncoderShared, steps: list[dict], name: str,
                  dtype: str = "fp32") -> tuple[Any, dict, list[dict], float]:
    """Run ``steps`` on a fresh copy of the source, then cast its float weights to ``dtype``:
    (LoadedEncoder, module map, step records, seconds)."""
    t0 = time.perf_counter()
    src = shared.source
    loaded = dataclasses.replace(src, model=copy.deepcopy(src.model), config=copy.deepcopy(src.config))
    ctx = Context(loaded, shared.calibration, progress=False, teacher_model=src)
    from miaotui.encoder import TruncationWarning

    with warnings.catch_warnings():  # long calibration paragraphs are cut to the limit: expected
        warnings.simplefilter("ignore", TruncationWarning)
        records = run_recipe(ctx, {"name": name, "steps": steps})
    if dtype != "fp32":
        if ctx.modules:
            raise ValueError(f"dtype {dtype} applies to float models, not to quantized modules")
        loaded.model.to(DTYPES[dtype])
    return loaded, ctx.modules, records, time.perf_counter() - t0


def embed(loaded, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Unnormalised embeddings (B, D) with the encoder engine; paragraphs over the limit are cut, for the
    source and the candidate alike."""
    from miaotui.encoder import Encoder, TruncationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        return Encoder(loaded).encode(texts, batch_size=batch_size, normalize=False)


def embedding_quality(emb: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    from miaotui.eval.embeddings import evaluate_embeddings

    r = evaluate_embeddings(emb, reference, [""] * len(emb))
    return {k: r[k] for k in ("texts", "mean_cosine", "min_cosine", "similarity_spearman")}


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_encoder(loaded, texts: list[str], reference: np.ndarray, objective: str,
                    settings: EncoderSpeedSettings) -> tuple[dict, dict, float, float]:
    """(quality on ``texts`` against ``reference``, the objective's figure, eval seconds, speed seconds)."""
    from miaotui.encoder import Encoder, TruncationWarning

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    t0 = time.perf_counter()
    enc = Encoder(loaded)  # prepares it as a loaded checkpoint would be (fused q/k/v, kernels picked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        ids, types = enc.tokenize(texts)
        q = embedding_quality(enc.embed(ids, types, settings.batch, normalize=False).numpy(), reference)
        eval_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sp = _speed(enc, ids, types, objective, settings)
    return q, sp, eval_s, time.perf_counter() - t0


def encoder_speed(loaded, texts: list[str], objective: str, settings: EncoderSpeedSettings) -> dict[str, Any]:
    """The objective's figure alone (no quality): a runoff timing (``optimize/runoff.py``)."""
    from miaotui.encoder import Encoder, TruncationWarning

    enc = Encoder(loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        ids, types = enc.tokenize(texts)
        return _speed(enc, ids, types, objective, settings)


def _speed(enc, ids, types, objective: str, settings: EncoderSpeedSettings) -> dict[str, Any]:
    sp: dict[str, Any] = {"objective": objective, "unit": OBJECTIVES[objective][1]}
    if objective == "throughput":  # tokenizing is the same for every candidate: only the model is timed
        sp["value"] = len(ids) / _median_time(lambda: enc.embed(ids, types, settings.batch), settings.repeats)
        sp.update(texts=len(ids), batch=settings.batch)
    elif objective == "latency":
        single = list(range(min(settings.single_texts, len(ids))))
        enc.embed([ids[0]], [types[0]], 1)  # warm-up at batch 1
        per_text = _median_time(lambda: [enc.embed([ids[i]], [types[i]], 1) for i in single], settings.repeats)
        sp.update(value=1000 * per_text / len(single), texts=len(single))
    else:
        sp["value"] = stored_bytes(enc.loaded.model) / 1e6
    return sp


def runtime_kinds(modules: dict[str, dict], model) -> list[str]:
    """The formats the layer linears run in: ``int8``, ``w8a8``, ``int4`` and, for those left float, ``dense``
    (fp32) or ``bf16``."""
    kinds = {s["kind"] for s in modules.values()}
    if any(isinstance(m, torch.nn.Linear) for m in model.layers.modules()):  # quantized ones are not nn.Linear
        kinds.add("bf16" if model.embeddings.word_embeddings.weight.dtype == torch.bfloat16 else "dense")
    return sorted(kinds)
