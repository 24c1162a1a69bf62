"""The ``distill`` recipe step: heal the model being compressed against the uncompressed source.

    steps:
      - prune-layers: {...}
      - distill: {steps: 200, lr: 1e-4, temperature: 2.0, hidden_loss: 1.0, batch_size: 4, seq_len: 256}
      - quantize: {method: gptq, bits: 4}

Trains on ``data`` (a text file) or, by default, on the recipe's calibration tokens (``--calib FILE`` or the
data-free text), re-cut into windows of ``seq_len``; ``holdout`` of them are kept out to report the gain.
The teacher is the source model, loaded once (``Context.teacher``). The hidden-state loss pairs each student
layer with the source layer it was copied from (found by identical norm weights, so after ``prune-layers``
too), else by relative depth, or as the ``layer_map`` parameter says.
"""

from __future__ import annotations

from typing import Any

from miaotui.compress.distill.config import DistillConfig, DistillError
from miaotui.compress.distill.data import cut_windows, file_windows
from miaotui.compress.distill.decoder import distill
from miaotui.compress.distill.student import blocks, layer_map, match_layers


def run_distill(ctx, params: dict[str, Any]) -> dict[str, Any]:
    from miaotui.compress.recipe import RecipeError
    from miaotui.loading.encoder import LoadedEncoder

    p = dict(params)
    data = p.pop("data", None)
    if isinstance(ctx.loaded, LoadedEncoder):
        return _run_distill_encoder(ctx, p, data)
    try:
        cfg = DistillConfig.from_params(p)
        student, teacher = ctx.loaded.model, ctx.teacher().model
        n_s, n_t = len(blocks(student)), len(blocks(teacher))
        kept = match_layers(student, teacher)
        if cfg.layer_map is None and kept is not None:
            cfg.layer_map = layer_map(kept)
        if data is not None:
            windows = file_windows(data, ctx.loaded.tokenizer, cfg.seq_len)
        else:
            windows = cut_windows(ctx.calib_ids(), cfg.seq_len)
        report = distill(student, teacher, windows, cfg, progress=ctx.progress)
    except DistillError as e:
        raise RecipeError(f"distill: {e.param + ': ' if e.param else ''}{e}") from None
    record = report.to_dict()
    record["data"] = str(data) if data is not None else "calibration tokens"
    record["teacher_layers"] = kept
    record["student_layers"], record["source_layers"] = n_s, n_t
    return record


def _run_distill_encoder(ctx, p: dict[str, Any], data: str | None) -> dict[str, Any]:
    """Encoders learn the source's pooled embeddings of real texts: ``data`` or ``--calib`` (one per line)."""
    from miaotui.compress.distill.encoder import distill_encoder
    from miaotui.compress.recipe import RecipeError
    from miaotui.encoder.io import read_texts

    source = data or ctx.calibration.file
    if source is None:  # the few data-free seed prompts are far too little text to distil an encoder on
        raise RecipeError("distill: data: an encoder distils on real text: give `data: FILE` in the step or "
                          "--calib FILE (one text per line, or .jsonl with a text field)")
    try:
        cfg = DistillConfig.from_params(p)
        teacher = ctx.teacher()
        kept = match_layers(ctx.loaded.model, teacher.model)
        if cfg.layer_map is None and kept is not None:
            cfg.layer_map = layer_map(kept)
        report = distill_encoder(ctx.loaded, teacher, read_texts(source), cfg, progress=ctx.progress)
    except DistillError as e:
        raise RecipeError(f"distill: {e.param + ': ' if e.param else ''}{e}") from None
    record = report.to_dict()
    record["data"], record["teacher_layers"] = str(source), kept
    return record
