"""Offline compression: transforms that swap modules in place (quantize, prune, low-rank), chained by a recipe."""
