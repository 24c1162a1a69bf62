"""The compressed checkpoint: a folder that ``load()`` reads directly, with no re-quantization.

    DIR/config.json        the source model's config (the architecture to build)
    DIR/model.safetensors  every tensor of the compressed model (fused names; packed codes as stored)
    DIR/tokenizer*.json    the tokenizer and chat template
    DIR/manifest.json      what was done (recipe, per-module quantization), from what (source hash),
                           by which miaotui, bytes, a sha256 of the weights, and the quality report
    DIR/modules.json, 1_Pooling/, sentence_bert_config.json
                           encoders only: the source's sentence-transformers files, so pooling survives
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from miaotui.errors import ModelLoadError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_identity(path: Path) -> dict[str, Any]:
    """The source model, hashed (a folder: its weight files) so a manifest says exactly what it came from."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return {"path": str(path), "sha256": h.hexdigest(), "bytes": sum(f.stat().st_size for f in files)}


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each tensor once (a tied head and its embedding share one parameter)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach()
    return out


def save_checkpoint(out_dir: str | os.PathLike, model: nn.Module, tokenizer, config: dict, modules: dict[str, dict],
                    recipe: dict, source: dict, quality: dict | None = None) -> dict:
    """Write the folder; ``modules`` maps quantized module names to their specs (``swap.module_spec``).
    Returns the manifest written."""
    from safetensors.torch import save_file

    from miaotui import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in _unique_state(model).items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "miaotui"})
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    manifest = {
        "format_version": FORMAT_VERSION,
        "miaotui_version": __version__,
        "architecture": config.get("model_type"),
        "recipe": recipe,
        "source": source,
        "modules": modules,
        "weights": {"file": WEIGHTS, "sha256": file_sha256(out / WEIGHTS), "bytes": (out / WEIGHTS).stat().st_size,
                    "tensors": len(tensors)},
        "quality": quality,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path / MANIFEST}: not a readable manifest ({e})") from None
    for key in ("format_version", "modules", "weights"):
        if key not in manifest:
            raise ModelLoadError(f"{path / MANIFEST}: '{key}' is missing (an edited or foreign manifest)")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ModelLoadError(f"{path}: checkpoint format {manifest['format_version']} is newer than this miaotui "
                             f"reads ({FORMAT_VERSION}); upgrade miaotui")
    return manifest


def update_quality(path: str | os.PathLike, quality: dict) -> None:
    """Record an evaluation in an existing checkpoint's manifest."""
    p = Path(path) / MANIFEST
    manifest = json.loads(p.read_text())
    manifest["quality"] = quality
    p.write_text(json.dumps(manifest, indent=2))


def build_checkpoint_model(cfg: dict, manifest: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                           skeleton: nn.Module | None = None):
    """The architecture on the meta device, fused, with quantized modules where the manifest says; then
    every tensor assigned, checked name by name and shape by shape. ``skeleton``: a meta-device model built
    by the caller (encoders, whose heads and pruned widths come from the tensors) instead of the config's."""
    from miaotui.compress.quant.swap import Int8Embedding, build_module, set_module
    from miaotui.models import model_class

    if skeleton is not None:
        model = skeleton
    else:
        cls = model_class(cfg.get("model_type"))
        with torch.device("meta"):
            model = cls.from_config(cfg)
    model.tie_weights()
    model.fuse()
    for name, spec in manifest["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"manifest names module {name!r}, which this {cfg.get('model_type')} "
                                 "model does not have (an edited manifest or a different config)") from None
        try:
            with torch.device("meta"):
                module = build_module(spec)
        except (KeyError, ValueError) as e:
            raise ModelLoadError(f"manifest entry for {name!r} is invalid: {e}") from None
        set_module(model, name, module)
        if spec.get("tied_embedding"):
            set_module(model, spec["tied_embedding"], Int8Embedding(module, dtype))
    expected = _unique_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise ModelLoadError(f"checkpoint has {len(unexpected)} tensor(s) the manifest does not explain, "
                             f"e.g. {', '.join(unexpected[:3])}")
    for name, t in tensors.items():
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape) or (t.is_floating_point() != want.is_floating_point()):
            raise ModelLoadError(f"{name}: stored {t.dtype} {tuple(t.shape)} does not match the manifest's "
                                 f"{want.dtype} {tuple(want.shape)}")
    quant_buffers = {f"{n}.{b}" for n in manifest["modules"] for b in ("scale", "zero")}
    sd = {k: v.to(dtype) if v.is_floating_point() and k not in quant_buffers else v for k, v in tensors.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()  # assign replaced the shared parameter: share it again
    if hasattr(model, "init_buffers"):  # decoders: RoPE tables (encoders have none)
        model.init_buffers()
    for module in model.modules():  # kernel scratch buffers (not stored; prepare() fills them): off meta
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[key] = torch.zeros(buf.shape, dtype=buf.dtype)
    return model.eval().requires_grad_(False)


ALIGN = 64  # bytes: what PyTorch's own CPU allocations guarantee, and vector kernels may assume


def read_checkpoint(path: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(manifest, config, tensors) of a checkpoint folder, the weights checked against the manifest's sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from miaotui.loading.hf import read_hf_config

    manifest = read_manifest(path)
    weights = path / manifest["weights"].get("file", WEIGHTS)
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: the checkpoint's weights are missing")
    want = manifest["weights"].get("sha256")
    if want and file_sha256(weights) != want:
        raise ModelLoadError(f"{weights}: sha256 does not match manifest.json (the file is corrupt or was "
                             "replaced after the checkpoint was written)")
    cfg = read_hf_config(path)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{weights}: unreadable safetensors file ({e})") from None
    # the tensors map the file, where safetensors aligns each to 8 bytes only; PyTorch's AVX-512 int8 weight
    # kernel (_weight_int8pack_mm) uses aligned 16-byte loads and crashed on such a weight: copy those
    return manifest, cfg, {name: t.clone() if t.data_ptr() % ALIGN else t for name, t in tensors.items()}


def load_checkpoint(path: Path, dtype: torch.dtype, progress: bool = False):
    """A decoder checkpoint as a ``LoadedModel``; an encoder checkpoint as a ``LoadedEncoder``."""
    from miaotui.loading import LoadedModel, _eos_ids
    from miaotui.loading.encoder import is_encoder_config, load_encoder_checkpoint
    from miaotui.loading.tokenizer import load_hf_tokenizer

    manifest, cfg, tensors = read_checkpoint(path)
    if is_encoder_config(cfg):
        return load_encoder_checkpoint(path, dtype, manifest, cfg, tensors)
    model = build_checkpoint_model(cfg, manifest, tensors, dtype)
    tokenizer = load_hf_tokenizer(path)
    stored: dict[str, int] = {}
    for t in tensors.values():
        stored[str(t.dtype).removeprefix("torch.")] = stored.get(str(t.dtype).removeprefix("torch."), 0) + 1
    return LoadedModel(model, tokenizer, cfg, path, "miaotui", stored, _eos_ids(cfg, tokenizer), manifest)
