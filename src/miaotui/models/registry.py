"""Architectures by Hugging Face ``model_type``."""

from __future__ import annotations

from miaotui.errors import ModelLoadError

_REGISTRY: dict[str, type] = {}


def register(*model_types: str):
    def wrap(cls: type) -> type:
        for name in model_types:
            _REGISTRY[name] = cls
        return cls

    return wrap


def supported() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def model_class(model_type: str | None) -> type:
    _import_all()
    if model_type not in _REGISTRY:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[model_type]


def _import_all() -> None:
    # importing the architecture modules runs their @register decorators
    from miaotui.models import gpt2, llama  # noqa: F401
