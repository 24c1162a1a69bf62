"""Encoders (BERT family): embeddings, fill-mask and classification on packed, padding-free batches."""

from miaotui.encoder.api import Encoder, MissingHeadError, TruncationWarning

__all__ = ["Encoder", "MissingHeadError", "TruncationWarning"]
