"""Quantization transforms applied to a finished model (the model file never branches on them)."""
