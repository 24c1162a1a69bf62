"""Quantization: algorithms (rtn, gptq, awq, smoothquant) produce ``QuantizedWeight``; ``qlinear`` runs them."""
