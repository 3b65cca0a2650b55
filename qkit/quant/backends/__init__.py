"""Backends that build checkpoints besides llm-compressor: GPTQModel and GGUF."""
