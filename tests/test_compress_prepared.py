"""A model prepared for inference (its linears swapped for native-kernel subclasses: GemvLinear, and
UpcastLinear for bf16) compresses exactly like the loaded one: every quantizer, pruner and factoriser
selects float linears by what they are (``nn.Linear``), not by their exact class."""

from __future__ import annotations

import pytest
import torch

from miaotui import kernels
from miaotui.compress.quant.qlinear import QuantLinear
from miaotui.compress.recipe import Calibration, Context, load_recipe, run_recipe
from miaotui.engine.prepare import prepare_for_inference
from miaotui.kernels.linear import GemvLinear
from miaotui.loading import load

IDS = torch.tensor([[5, 77, 123, 9, 200, 31, 64, 250, 18, 3, 99, 141]])


def compressed(folder, recipe: str | list, prepared: bool):
    loaded = load(folder)
    if prepared:
        prepare_for_inference(loaded.model)
        assert any(isinstance(m, GemvLinear) for m in loaded.model.modules())
    steps = load_recipe(recipe)["steps"] if isinstance(recipe, str) else recipe
    run_recipe(Context(loaded, Calibration(samples=4, seq_len=32), progress=False), {"name": "t", "steps": steps})
    return loaded.model


@pytest.mark.skipif(not kernels.available(), reason="native kernels do not build on this machine")
@pytest.mark.parametrize("recipe", ["int4-rtn", "int8", "int4-awq", [{"lowrank": {"ratio": 0.5, "whiten": False}}]],
                         ids=["rtn", "gptq", "awq", "lowrank"])
def test_prepared_model_compresses_like_the_loaded_one(hf_folder, native_preferred, monkeypatch, recipe):
    monkeypatch.setenv("MIAOTUI_NATIVE_DENSE", "1")
    folder, _ = hf_folder("llama-gqa-untied")
    plain, prepared = compressed(folder, recipe, False), compressed(folder, recipe, True)
    kinds = lambda m: sorted((n, type(mod).__name__) for n, mod in m.named_modules()  # noqa: E731
                             if isinstance(mod, QuantLinear) or type(mod).__name__ == "FactorizedLinear")
    assert kinds(prepared) == kinds(plain) and kinds(plain)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(IDS), plain(IDS), atol=2e-4, rtol=2e-4)
