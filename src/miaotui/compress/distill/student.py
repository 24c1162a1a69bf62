"""Students with fewer layers, initialised from the teacher's own layers, and which teacher layer each
student layer should imitate.

    student, keep = layer_subset(teacher, evenly_spaced(30, 15))    # a copy: the teacher is untouched
    layer_map(keep) → {0: 0, 1: 2, ...}                              # student layer i ↔ teacher layer keep[i]
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from miaotui.compress.distill.config import DistillError
from miaotui.encoder.prune import evenly_spaced

__all__ = ["blocks", "evenly_spaced", "layer_subset", "layer_map", "default_layer_map", "parse_layers",
           "kept_layers_from_records", "match_layers"]


def _stack_owner(model: nn.Module) -> tuple[nn.Module, str, object, str]:
    """(module holding the layer list, its attribute, the args dataclass, the args' layer-count field)."""
    if hasattr(model, "model") and hasattr(model.model, "layers"):  # Llama family
        return model.model, "layers", model.args, "num_hidden_layers"
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):  # GPT-2
        return model.transformer, "h", model.args, "n_layer"
    if isinstance(getattr(model, "layers", None), nn.ModuleList):  # BERT-family encoder
        return model, "layers", model.args, "num_hidden_layers"
    raise DistillError(f"{type(model).__name__}: no layer stack found (supported: Llama family, GPT-2, BERT)")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers, in order."""
    owner, attr, _, _ = _stack_owner(model)
    return getattr(owner, attr)


def config_layer_key(config: dict) -> str:
    """The config.json key holding the layer count (``n_layer`` for GPT-2)."""
    return "n_layer" if "n_layer" in config and "num_hidden_layers" not in config else "num_hidden_layers"


def parse_layers(spec: str | int | Sequence[int], n_teacher: int) -> list[int]:
    """``15`` (keep 15, evenly spaced, first and last included) or ``"0,2,4"`` / ``[0, 2, 4]`` (those indices)."""
    if isinstance(spec, str):
        spec = spec.strip()
        if "," not in spec:
            try:
                spec = int(spec)
            except ValueError:
                raise DistillError(f"student layers: {spec!r} is neither a count nor a comma-separated "
                                   "list of layer indices", "student_layers") from None
        else:
            try:
                spec = [int(x) for x in spec.split(",") if x.strip()]
            except ValueError:
                raise DistillError(f"student layers: {spec!r} is not a list of integers", "student_layers") from None
    if isinstance(spec, int):
        if not 1 <= spec <= n_teacher:
            raise DistillError(f"student layers: the teacher has {n_teacher} layers; keep 1..{n_teacher}, "
                               f"not {spec}", "student_layers")
        return evenly_spaced(n_teacher, spec)
    keep = list(spec)
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= n_teacher:
        raise DistillError(f"student layers: indices must be increasing, in 0..{n_teacher - 1}, got {keep}",
                           "student_layers")
    return keep


def layer_subset(teacher: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` with only the layers ``keep`` (in order); the teacher is left untouched."""
    owner, attr, _, _ = _stack_owner(teacher)
    stack = getattr(owner, attr)
    keep = list(keep)
    if not keep or sorted(set(keep)) != keep or keep[-1] >= len(stack):
        raise DistillError(f"keep must be increasing layer indices below {len(stack)}, got {keep}", "student_layers")
    # copy everything but the dropped layers: the memo maps them to None, so they are never duplicated
    memo = {id(stack[i]): None for i in range(len(stack)) if i not in set(keep)}
    student = copy.deepcopy(teacher, memo)
    s_owner, _, s_args, key = _stack_owner(student)
    setattr(s_owner, attr, nn.ModuleList(getattr(s_owner, attr)[i] for i in keep))
    setattr(s_args, key, len(keep))
    return student


def layer_map(keep: Sequence[int]) -> dict[int, int]:
    """Student layer i imitates the teacher layer it was copied from."""
    return {i: t for i, t in enumerate(keep)}


def default_layer_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """When the kept layers are not known: student layer i ↔ teacher layer at the same relative depth,
    the last to the last (both outputs feed the same final norm and head)."""
    return {i: round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)}


def kept_layers_from_records(records: list[dict], n_teacher: int) -> list[int] | None:
    """The teacher layers a checkpoint's student kept, read from its manifest's recipe records: a
    ``prune-layers`` step's kept/dropped list (indices into the model it pruned, so they compose) or an
    earlier ``distill`` step's ``teacher_layers`` (indices into the teacher itself, so they replace)."""
    keep = list(range(n_teacher))
    found = False
    for rec in records or []:
        if rec.get("step") == "distill" and rec.get("teacher_layers"):
            keep, found = [int(t) for t in rec["teacher_layers"]], True
        elif rec.get("step") == "prune-layers":
            kept = next((rec[k] for k in ("kept_layers", "kept", "keep") if isinstance(rec.get(k), list)), None)
            dropped = next((rec[k] for k in ("dropped_layers", "dropped", "removed", "layers")
                            if isinstance(rec.get(k), list)), None)
            if kept is not None:
                keep, found = [keep[i] for i in kept], True
            elif dropped is not None:
                keep, found = [t for i, t in enumerate(keep) if i not in set(dropped)], True
    return keep if found else None


def _fingerprint(block: nn.Module) -> list:
    """The block's norm weights: untouched by pruning and quantization, and distinct between layers."""
    return [p for n, p in block.named_parameters() if p.dim() == 1 and "norm" in n]


def match_layers(student: nn.Module, teacher: nn.Module) -> list[int] | None:
    """Which teacher layer each student layer was copied from, found by identical norm weights (a student
    made by dropping layers, however it was then pruned or quantized); None when that is not unambiguous."""
    t_prints = [_fingerprint(b) for b in blocks(teacher)]
    keep = []
    for s_block in blocks(student):
        s_print = _fingerprint(s_block)
        hits = [j for j, t_print in enumerate(t_prints)
                if s_print and len(s_print) == len(t_print)
                and all(a.shape == b.shape and bool((a == b).all()) for a, b in zip(s_print, t_print))]
        if len(hits) != 1:
            return None
        keep.append(hits[0])
    return keep if keep == sorted(set(keep)) else None
