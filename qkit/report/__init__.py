"""Report: the helpers a notebook calls under the report runner, and papermill runs of the notebooks into
HTML with an index that shows what each study found."""
from qkit.report.notebook import QUIET_ENV, SUMMARY_ENV, publish, quiet  # noqa: F401
from qkit.report.run import REPO, run_report  # noqa: F401
