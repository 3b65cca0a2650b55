"""What a study notebook calls besides its study: `quiet()` for the report runner, and `publish()`, which
hands the study's summary to the report index."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from qkit import REPORT_ENV
from qkit.core.store import write_json_atomic

# Libraries read these when they are imported, which in a notebook happens before `quiet()` runs
# (tqdm >= 4.66 reads TQDM_* at import time, and `import qkit...` imports it via transformers), so the
# report kernel starts with them set.
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # llm-compressor logs through loguru to stdout, where the stderr filter below cannot catch it.
    "LLM_COMPRESSOR_LOG_LEVEL": "ERROR",
}


def quiet() -> None:
    """Silence warnings, library logging and progress bars when the notebook runs under `qkit report`, and
    let table cells show their whole text (an HTML cell wraps; pandas would cut it at 50 characters, as it
    did the library versions of the provenance tables).

    Call it in a notebook's first code cell. Interactively (no `QKIT_REPORT=1`) it changes nothing, so
    progress bars stay on in JupyterLab.
    """
    if os.environ.get(REPORT_ENV) != "1":
        return
    from functools import partialmethod

    import pandas as pd
    from tqdm import notebook

    pd.set_option("display.max_colwidth", None)
    os.environ.update(QUIET_ENV)  # for a kernel started by something other than run_report
    warnings.filterwarnings("ignore")
    # Effective whether or not the library is imported yet: each configures its logger from the
    # environment on import, and setLevel covers one imported already.
    for name in ("transformers", "datasets", "huggingface_hub", "accelerate", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "llmcompressor" in sys.modules:  # it configured loguru on import; redo that with our level
        sys.modules["llmcompressor"].configure_logger()
    # In a kernel tqdm.auto is tqdm.notebook, whose widget bars ignore TQDM_DISABLE (it passes
    # disable=False itself); patching the class also reaches names imported before this call.
    notebook.tqdm_notebook.__init__ = partialmethod(notebook.tqdm_notebook.__init__, disable=True)


# Set by the report runner for each notebook: where `publish` writes the study's summary for the index.
SUMMARY_ENV = "QKIT_SUMMARY_PATH"


def publish(result: Any) -> None:
    """Hand a study's ``summary()`` and its headline figure to the report index (the notebook's last
    cell calls it). Outside `qkit report` it does nothing."""
    target = os.environ.get(SUMMARY_ENV)
    if not target:
        return
    summary = result.summary().as_dict()
    if summary.get("figure"):
        png = Path(target).with_suffix(".png")
        result.figures()[summary["figure"]].savefig(png, dpi=90, bbox_inches="tight")
        summary["figure"] = png.name
    write_json_atomic(Path(target), summary)
