"""qkit: a Jupyter-native research kit for LLM quantization."""
__version__ = "0.1.0"
# Here rather than in qkit.models so that `qkit --help` names it without importing torch.
DEFAULT_MODEL = "smollm2-135m"
# Set in the kernel of a `qkit report` run, where interactive panels become notes (qkit.studies.plots).
REPORT_ENV = "QKIT_REPORT"
