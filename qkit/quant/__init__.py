"""Quantization: the method registry, checkpoints in the store, and the backends that build them."""
