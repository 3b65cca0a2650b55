"""qkit.report on two small notebooks in tests/notebooks: one that shows a table and a figure, one that
raises. The notebooks run once per module (a kernel start each, a few seconds)."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import nbformat
import pytest

from qkit.core.errors import QkitError
from qkit.report import quiet, run_report

NOTEBOOKS = Path(__file__).parent / "notebooks"
# table_plot declares `rows` on a line whose comment holds a second "=", which papermill's own
# parameter inspection skips: it must still count as a parameter.
PARAMS = {"rows": 4, "title": "Injected Title", "message": "kaboom from params"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    # A "python3" kernelspec that cannot start, found first: the runner must not go by kernel name.
    decoy = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
    decoy.mkdir(parents=True)
    (decoy / "kernel.json").write_text(json.dumps(
        {"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "decoy", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(decoy.parent.parent))
        records = run_report(None, PARAMS, out, notebooks_dir=NOTEBOOKS)
    return out, {r["name"]: r for r in records}


def outputs(path: Path) -> list[dict]:
    return [o for c in nbformat.read(path, as_version=4).cells for o in c.get("outputs", [])]


def test_records(run):
    out, records = run
    assert list(records) == ["fails", "table_plot"]  # notebooks=None: every notebook, sorted
    assert records["table_plot"]["status"] == "ok" and records["table_plot"]["error"] is None
    assert records["fails"]["status"] == "failed"
    assert records["fails"]["error"] == "ValueError: kaboom from params"
    # Each notebook got only the parameters its own parameters cell declares.
    assert records["table_plot"]["params"] == {"rows": 4, "title": "Injected Title"}
    assert records["fails"]["params"] == {"message": "kaboom from params"}
    for r in records.values():
        assert (out / r["html"]).is_file() and (out / r["ipynb"]).is_file()
        assert r["seconds"] > 0


def test_html_shows_results_not_code(run):
    out, _ = run
    page = (out / "table_plot.html").read_text()
    assert "method_3" in page and "26.456" in page  # the table, with the injected rows=4
    assert re.search(r'<img [^>]*src="data:image/png;base64,', page)  # the figure, embedded
    assert "print(&quot;kernel python" not in page and "plt.subplots" not in page  # code hidden
    assert "celltag_injected-parameters" not in page and "celltag_parameters" in page
    assert '<div class="qkit-header"' in page and "Injected Title" in page and "rows" in page
    assert "kernel python: " + sys.executable in page  # the kernel ran this interpreter


def test_noise_is_silenced(run):
    out, _ = run
    executed = outputs(out / "table_plot.ipynb")
    stderr = "".join(o["text"] for o in executed if o.get("name") == "stderr")
    assert stderr == "noise on stderr\n"  # no warning, no console progress bar
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in executed)
    # The executed notebook keeps stderr; the HTML drops it.
    assert "noise on stderr" not in (out / "table_plot.html").read_text()


def test_failed_notebook_still_has_html(run):
    out, _ = run
    page = (out / "fails.html").read_text()
    assert "kaboom from params" in page and "ValueError" in page
    assert "before the failure" in page and "never printed" not in page
    assert "qkit-status-failed" in page


def test_index(run):
    out, _ = run
    page = (out / "index.html").read_text()
    assert 'href="fails.html"' in page and 'href="table_plot.html"' in page
    assert page.count("qkit-status-failed") == 1 and page.count("qkit-status-ok") == 1
    assert set(json.loads((out / "index.json").read_text())) == {"fails", "table_plot"}


def test_rerun_of_one_notebook_keeps_the_others(run, tmp_path):
    out, records = run
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    [again] = run_report(["fails"], {"message": "second run"}, tmp_path, notebooks_dir=NOTEBOOKS)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["table_plot"] == records["table_plot"]
    assert index["fails"]["error"] == again["error"] == "ValueError: second run"
    page = (tmp_path / "index.html").read_text()
    assert 'href="table_plot.html"' in page and "second run" in page


def test_unknown_parameter_is_an_error(tmp_path):
    with pytest.raises(QkitError, match="'methdos'.*message, rows, title"):
        run_report(None, {"methdos": "rtn", "rows": 2}, tmp_path, notebooks_dir=NOTEBOOKS)
    assert not any(tmp_path.iterdir())  # nothing ran


def test_notebook_names(tmp_path):
    with pytest.raises(QkitError, match="'nope'.*fails, table_plot"):
        run_report(["nope"], None, tmp_path, notebooks_dir=NOTEBOOKS)
    # A parameter that only an unselected notebook declares is unknown here.
    with pytest.raises(QkitError, match="'message'"):
        run_report(["table_plot.ipynb"], {"message": "x"}, tmp_path, notebooks_dir=NOTEBOOKS)
    with pytest.raises(QkitError, match="no notebooks"):
        run_report(None, None, tmp_path, notebooks_dir=tmp_path / "empty")


def test_unknown_kernel_is_an_error(tmp_path):
    with pytest.raises(QkitError, match="no Jupyter kernel named 'nokernel'"):
        run_report(["fails"], None, tmp_path, notebooks_dir=NOTEBOOKS, kernel_name="nokernel")


def test_number_prefix_resolves(tmp_path):
    from qkit.report.run import _resolve

    for name in ("01_first", "02_second"):
        shutil.copy(NOTEBOOKS / "fails.ipynb", tmp_path / f"{name}.ipynb")
    assert _resolve(["02"], tmp_path) == [tmp_path / "02_second.ipynb"]
    assert _resolve(["01_first", "01"], tmp_path) == [tmp_path / "01_first.ipynb"]
    with pytest.raises(QkitError, match="'0' is not a notebook"):
        _resolve(["0"], tmp_path)


def test_quiet_does_nothing_interactively(monkeypatch):
    monkeypatch.delenv("QKIT_REPORT", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    filters = list(warnings.filters)
    quiet()
    assert warnings.filters == filters
    assert "TQDM_DISABLE" not in os.environ


def test_panel_is_a_widget_in_jupyterlab_and_a_note_in_a_report(monkeypatch):
    import ipywidgets as widgets

    from qkit.studies.plots import panel

    seen = []
    monkeypatch.delenv("QKIT_REPORT", raising=False)
    w = panel(lambda n: seen.append(n), n=widgets.IntSlider(value=3, min=0, max=9))
    assert isinstance(w, widgets.interactive) and seen == [3]  # drawn once with the defaults
    w.children[0].value = 5
    assert seen == [3, 5]
    monkeypatch.setenv("QKIT_REPORT", "1")
    note = panel(lambda n: seen.append(n), n=widgets.IntSlider(value=3))
    assert "JupyterLab" in note.data and seen == [3, 5]  # no widget, nothing run


def test_notebooks_run_two_at_a_time_give_the_same_reports(run, tmp_path):
    _, one_by_one = run
    records = {r["name"]: r for r in run_report(None, PARAMS, tmp_path, notebooks_dir=NOTEBOOKS, jobs=2)}
    assert list(records) == list(one_by_one)  # in the notebooks' order, whichever finished first
    for name, r in records.items():
        assert (r["status"], r["error"]) == (one_by_one[name]["status"], one_by_one[name]["error"])
        assert (tmp_path / r["html"]).is_file()
    assert "Injected Title" in (tmp_path / "table_plot.html").read_text()
    with pytest.raises(QkitError, match="jobs must be a whole number"):
        run_report(None, PARAMS, tmp_path, notebooks_dir=NOTEBOOKS, jobs=0)


def test_kernels_run_at_once_share_the_cores_torch_threads(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import torch; print(torch.get_num_threads())")])
    threads = {}
    for jobs in (1, 2):
        path = tmp_path / f"threads{jobs}.ipynb"
        nbformat.write(nb, path)
        run_report([path], out_dir=tmp_path / f"out{jobs}", jobs=jobs)
        threads[jobs] = int(outputs(tmp_path / f"out{jobs}" / path.name)[0]["text"])
    assert threads[2] == max(1, threads[1] // 2)
