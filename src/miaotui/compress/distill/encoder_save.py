"""Saving a distilled encoder as a plain Hugging Face / sentence-transformers folder: it loads with
``Encoder(DIR)`` (and with transformers or sentence-transformers), with the source's tokenizer and pooling.

The weights go back to ``BertModel`` names (q/k/v unfused). The masked-LM and classifier heads are not
written: embedding distillation trains the body for the sentence embedding, which leaves them stale.
``distill.json`` records what was done (recipe, source, report).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from miaotui.compress.distill.config import DistillError

RECORD = "distill.json"
_LAYER_NAMES = {  # ours (after "layers.{i}.") → transformers' (after "encoder.layer.{i}.")
    "attention.out.": "attention.output.dense.",
    "attention_norm.": "attention.output.LayerNorm.",
    "intermediate.": "intermediate.dense.",
    "output.": "output.dense.",
    "output_norm.": "output.LayerNorm.",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack")


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """``BertModel`` tensor names and layouts of a ``BertEncoder`` body (+ pooler)."""
    hidden = model.args.hidden_size
    sd: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith(("mlm.", "classifier.")):
            continue
        if name.startswith("embeddings.norm."):
            sd[name.replace("embeddings.norm.", "embeddings.LayerNorm.")] = t
        elif name.startswith("embeddings."):
            sd[name] = t
        elif name.startswith("pooler."):
            sd[name.replace("pooler.", "pooler.dense.")] = t
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            prefix = f"encoder.layer.{i}."
            if rest.startswith("attention.qkv."):
                kind = rest.rsplit(".", 1)[1]
                if t.shape[0] != 3 * hidden:
                    raise DistillError(f"layer {i} has pruned attention heads: a Hugging Face BERT folder cannot "
                                       "describe that (save the model as a miaotui checkpoint instead)", "output")
                for part, chunk in zip(("query", "key", "value"), t.chunk(3, dim=0)):
                    sd[f"{prefix}attention.self.{part}.{kind}"] = chunk
            elif rest.startswith(("attention.query.", "attention.key.", "attention.value.")):
                if t.shape[0] != hidden:
                    raise DistillError(f"layer {i} has pruned attention heads: a Hugging Face BERT folder cannot "
                                       "describe that", "output")
                sd[prefix + rest.replace("attention.", "attention.self.", 1)] = t
            else:
                key = next(k for k in _LAYER_NAMES if rest.startswith(k))
                sd[prefix + _LAYER_NAMES[key] + rest[len(key):]] = t
        else:
            raise DistillError(f"{name}: no Hugging Face name known for this tensor", "output")
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_encoder(out_dir: str | Path, loaded, record: dict[str, Any]) -> Path:
    """Write ``loaded`` (a ``LoadedEncoder`` whose model was distilled) to ``out_dir``: weights, config with
    the student's layer count, the source folder's tokenizer and sentence-transformers files, and the record."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(loaded.path)
    for f in src.iterdir():  # tokenizer, sentence-transformers config, README: everything but weights
        if f.is_file() and f.name != "config.json" and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
    modules = src / "modules.json"
    if modules.is_file():  # the pooling / normalize folders it names
        for m in json.loads(modules.read_text()):
            sub = m.get("path") or ""
            if sub and (src / sub).is_dir():
                shutil.copytree(src / sub, out / sub, dirs_exist_ok=True)
    config = {**loaded.config, "num_hidden_layers": loaded.model.args.num_hidden_layers}
    roberta = config.get("model_type") in ("roberta", "xlm-roberta")
    config["architectures"] = ["RobertaModel" if roberta else "BertModel"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(hf_state_dict(loaded.model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / RECORD).write_text(json.dumps(record, indent=2, default=str))
    return out


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``distill.json`` of a folder this module wrote (its recipe records, source and quality), or None."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{path}: not a readable record ({e})", "student") from None
    return record if isinstance(record, dict) else None
