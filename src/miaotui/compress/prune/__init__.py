"""Pruning: unstructured and N:M sparsity (masks in dense weights) and structured pruning (smaller tensors)."""
