"""Hugging Face model folders: ``config.json`` + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from miaotui.errors import ModelLoadError


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ModelLoadError(f"{path}: no 'model_type' key, cannot tell the architecture")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{index}: malformed shard index ({e!r})") from None
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shard(s) named in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelLoadError(
            f"{folder}: only pickle weights (.bin/.pt) found; miaotui loads safetensors only, since pickle can "
            "run arbitrary code (convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise ModelLoadError(f"{folder}: no *.safetensors weight files")


def load_hf_weights(folder: Path, dtype: torch.dtype, progress: bool = False) -> dict[str, torch.Tensor]:
    from tqdm import tqdm

    sd: dict[str, torch.Tensor] = {}
    files = weight_files(folder)
    for f in tqdm(files, desc="loading shards", disable=not progress or len(files) < 2):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    t = fh.get_tensor(name)
                    sd[name] = t.to(dtype) if t.is_floating_point() else t
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ModelLoadError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return sd


def weight_dtypes(folder: Path) -> dict[str, int]:
    """Count of tensors per stored dtype (for `inspect`), read from the headers only."""
    counts: dict[str, int] = {}
    for f in weight_files(folder):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                counts[meta["dtype"]] = counts.get(meta["dtype"], 0) + 1
    return counts
