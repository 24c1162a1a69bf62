"""Our own plain-PyTorch model implementations, one file per architecture."""

from miaotui.models.base import CausalLM
from miaotui.models.registry import model_class, supported

__all__ = ["CausalLM", "model_class", "supported"]
