"""qkit: a Jupyter-native research kit for LLM quantization."""
__version__ = "0.1.0"
