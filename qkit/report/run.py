"""Execute the study notebooks into HTML reports: `qkit report`.

Each notebook in `notebooks/` runs under papermill with the parameters it declares, and is kept executed
as `reports/<name>.ipynb` and converted to `reports/<name>.html` with the code hidden. A notebook that
fails still gets its HTML, showing the error, and the others still run. `reports/index.html` lists
every report; its records live in `reports/index.json`, so a run of one notebook keeps the others listed.

Notebooks call `qkit.report.quiet()` in their first code cell: under the report runner it silences
warnings, library logging and progress bars, which would otherwise fill the HTML.

papermill and nbconvert are imported inside the functions that use them, so that `quiet()` costs a
notebook nothing to import.
"""
from __future__ import annotations

import ast
import datetime
import html
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import qkit
from qkit import REPORT_ENV
from qkit.core import provenance
from qkit.core.errors import QkitError, lookup
from qkit.core.store import CACHE_ENV, default_root, write_json_atomic
from qkit.report.notebook import QUIET_ENV, SUMMARY_ENV
from qkit.studies import cells

REPO = Path(qkit.__file__).resolve().parent.parent


def run_report(notebooks: list[str | Path] | None = None, params: dict | None = None,
               out_dir: str | Path = "reports", *, notebooks_dir: str | Path | None = None,
               kernel_name: str | None = None, timeout: int | None = None, executor: str = "local",
               ray_address: str | None = None, jobs: int = 1) -> list[dict]:
    """Execute notebooks into `out_dir/<name>.ipynb` and `out_dir/<name>.html`; update the index.

    notebooks: paths, file names or bare names (`02_quantization_methods`, or its number `02`) in
        `notebooks_dir` (default `<repo>/notebooks`); None runs every notebook there, in sorted order.
    params: values for the notebooks' `parameters` cells. Each notebook gets only the keys it declares;
        a key that no selected notebook declares is an error (a typo must not vanish silently).
    kernel_name: a named Jupyter kernelspec; by default the kernel runs this very Python interpreter.
    timeout: seconds allowed per cell (default: no limit).
    executor: ``local`` runs the notebooks one after another here; ``ray`` runs them in parallel as Ray
        tasks (on the cluster at `ray_address`, None: a local instance) and gives every notebook that
        declares ``executor`` and ``ray_address`` that cluster, so that its study's cells run there too.
    jobs: with the local executor, how many notebooks run at once, each in its own kernel (a study's cells
        still use that study's own worker processes). A warm rerun, whose notebooks mostly import and
        read the store, takes about half as long at 2 on 2 cores.

    Returns one record per notebook: name, status ("ok" or "failed"), error, params, started,
    seconds, html, ipynb, git_commit. A failed notebook does not raise; check the statuses.
    """
    nb_dir = Path(notebooks_dir) if notebooks_dir is not None else REPO / "notebooks"
    paths = _resolve(notebooks, nb_dir)
    declared = {p: _parameters(p) for p in paths}
    params = dict(params or {})
    known = set().union(*declared.values())
    unknown = sorted(set(params) - known)
    if unknown:
        valid = ", ".join(sorted(known)) or "(none: these notebooks take no parameters)"
        raise QkitError(f"no selected notebook has a parameter named {', '.join(map(repr, unknown))}",
                        f"use one of: {valid}")
    if kernel_name:
        _check_kernel(kernel_name)
    lookup(dict.fromkeys(cells.EXECUTORS), executor, "executor")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise QkitError(f"jobs must be a whole number of notebooks to run at once, at least 1; got {jobs!r}",
                        "give 1 to run them one after another, or 2 to run two at a time")
    cluster = cells.connect(ray_address) if executor == "ray" else None
    if cluster is not None:  # the notebooks' kernels join this cluster rather than start their own
        params = {"executor": "ray", "ray_address": cluster.get_runtime_context().gcs_address, **params}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # papermill checks parameters too, with the line parser _parameters explains, and warns about
    # ones it misreads ("Passed unknown parameter: methods") although they are injected all the same.
    papermill_log = logging.getLogger("papermill")
    level = papermill_log.level
    papermill_log.setLevel(logging.ERROR)
    given = {p: {k: v for k, v in params.items() if k in declared[p]} for p in paths}
    runs = (_run_on_ray(cluster, paths, given, out, kernel_name, timeout) if cluster is not None
            else _run_local(paths, given, out, kernel_name, timeout, jobs))
    try:
        records = []
        for path, record in zip(paths, runs):
            # Only a kernel that never started leaves no executed notebook; the source stands in.
            executed = out / record["ipynb"]
            _write_html(executed if executed.exists() else path, out / record["html"], record,
                        declared[path])
            _update_index(out, record)
            records.append(record)
            print(f"{record['name']}: {record['status']} in {record['seconds']:.1f} s -> "
                  f"{out / record['html']}", flush=True)
            if record["summary"]:
                print(f"  {record['summary']['headline']} [{record['summary']['status']}]", flush=True)
    finally:
        papermill_log.setLevel(level)
    return records


def _run_local(paths: list[Path], given: dict[Path, dict], out: Path, kernel_name: str | None, timeout: int | None,
               jobs: int) -> Iterator[dict]:
    """The notebooks here, `jobs` at a time; their records in the order of `paths`. Threads suffice: each
    waits on its own kernel process. Two or more kernels share the cores' torch threads: two kernels of 2
    threads each on 2 cores left one of them running at 14% of a core for 13 minutes of a cold run (OpenMP
    threads spin while they wait)."""
    threads = None if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(jobs) as pool:
        runs = [pool.submit(_run_one, p, given[p], out, kernel_name, timeout, threads=threads) for p in paths]
        for run in runs:
            yield run.result()


def _run_on_ray(ray, paths: list[Path], given: dict[Path, dict], out: Path, kernel_name: str | None,
                timeout: int | None) -> Iterator[dict]:
    """Every notebook as a Ray task, all at once; their records in the order of `paths`. A task carries its
    notebook and brings back what it wrote, so a node needs no path of this machine but the store's."""
    # No CPU for the task itself: its kernel waits on the study's cells, which ask for their own; a notebook
    # holding a CPU could starve its own cells on a small cluster.
    task = ray.remote(num_cpus=0, max_retries=cells.RAY_RETRIES)(_notebook_task).options(
        runtime_env={"env_vars": {CACHE_ENV: str(default_root().resolve())}})
    refs = [task.remote(p.name, p.read_bytes(), given[p], kernel_name, timeout, os.getcwd()) for p in paths]
    for path, ref in zip(paths, refs):
        record, files = ray.get(ref)
        for name, content in files.items():
            (out / name).write_bytes(content)
        yield {**record, "notebook": str(path)}


def _notebook_task(name: str, source: bytes, params: dict, kernel_name: str | None, timeout: int | None,
                   cwd: str) -> tuple[dict, dict[str, bytes]]:
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / name, Path(tmp) / "out"
        path.write_bytes(source)
        out.mkdir()
        record = _run_one(path, params, out, kernel_name, timeout, cwd if Path(cwd).is_dir() else tmp)
        return record, {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}


def _run_one(path: Path, params: dict, out: Path, kernel_name: str | None, timeout: int | None,
             cwd: str | None = None, threads: int | None = None) -> dict:
    """Execute one notebook into out/<name>.ipynb; a failure is returned in the record, not raised. Relative
    paths in its parameters mean what they mean in `cwd` (default: this process's directory). `threads`:
    the kernel's torch threads (OMP_NUM_THREADS), None: torch's default, one per core."""
    import papermill

    executed = out / f"{path.stem}.ipynb"
    summary_path = out / f"{path.stem}.summary.json"
    for stale in (summary_path, summary_path.with_suffix(".png")):
        stale.unlink(missing_ok=True)  # a failed run must not show the last run's findings
    started = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    error = None
    try:
        # papermill saves after every cell, so a failed run leaves its partial notebook behind.
        papermill.execute_notebook(
            # The caller's directory, so that a relative path in a parameter (your data, checkpoint or
            # recipe) means what it means on the command line; the notebooks read no files of their own.
            str(path), str(executed), parameters=params, cwd=cwd or os.getcwd(),
            kernel_name=kernel_name or "python3", progress_bar=sys.stderr.isatty(),
            execution_timeout=timeout,
            kernel_manager_class=_kernel_manager_class(kernel_name, {
                SUMMARY_ENV: str(summary_path.resolve()), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}))
    except papermill.PapermillExecutionError as e:
        error = f"{e.ename}: {e.evalue}"
    except Exception as e:  # a dead kernel or a cell timeout: still report it, run the others
        error = f"{type(e).__name__}: {e}".splitlines()[0]  # a timeout goes on with the cell's code
    summary = json.loads(summary_path.read_text()) if summary_path.exists() and not error else None
    return {
        "name": path.stem, "notebook": str(path), "status": "failed" if error else "ok", "error": error,
        "summary": summary,
        "params": params, "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1), "html": f"{path.stem}.html",
        "ipynb": executed.name, "git_commit": provenance.git_commit(),
    }


def _resolve(notebooks: list[str | Path] | None, nb_dir: Path) -> list[Path]:
    available = sorted(nb_dir.glob("*.ipynb")) if nb_dir.is_dir() else []
    names = ", ".join(p.stem for p in available) or f"(none in {nb_dir})"
    if notebooks is None:
        if not available:
            raise QkitError(f"there are no notebooks in {nb_dir}",
                            "pass notebooks_dir or notebook paths")
        return available
    out: list[Path] = []
    for key in map(str, notebooks):
        if key.endswith(".ipynb") and Path(key).is_file():
            found = [Path(key)]
        else:
            found = [p for p in available if key in (p.stem, p.name)] or \
                    [p for p in available if p.stem.startswith(key + "_")]
        if len(found) != 1:
            what = "matches several notebooks" if found else "is not a notebook"
            raise QkitError(f"{key!r} {what}", f"name one of: {names}")
        if found[0] not in out:
            out.append(found[0])
    return out


def _parameters(path: Path) -> dict[str, str]:
    """The names the notebook's `parameters` cell assigns, each with its default as written there."""
    import nbformat
    from IPython.core.inputtransformer2 import TransformerManager

    cell = next((c for c in nbformat.read(path, as_version=4).cells
                 if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        return {}
    # Not papermill.inspect_notebook: it skips every line holding a second "=", so a parameter
    # commented "# None = all methods" would be rejected. The transform turns %magics into Python.
    source = TransformerManager().transform_cell(cell.source)
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise QkitError(f"the parameters cell of {path} is not valid Python ({e.msg}, line {e.lineno})",
                        "fix that cell so that it runs") from e
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    found[target.id] = ast.get_source_segment(source, node.value)
    return found


def _check_kernel(kernel_name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    names = sorted(KernelSpecManager().find_kernel_specs())
    if kernel_name not in names:
        raise QkitError(f"there is no Jupyter kernel named {kernel_name!r}",
                        f"use one of: {', '.join(names)}, or leave it out to run this Python")


def _kernel_env() -> dict[str, str]:
    # The kernel imports the same qkit as the caller even when qkit is not installed, only on sys.path.
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # The kernel runs in the notebook's folder: a relative cache path would name another, empty cache.
    return {REPORT_ENV: "1", **QUIET_ENV, "PYTHONPATH": pythonpath, CACHE_ENV: str(default_root().resolve())}


def _kernel_manager_class(kernel_name: str | None, env: dict[str, str]) -> type:
    import zmq
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ReportKernelManager(AsyncKernelManager):
        """Starts the kernel with the report environment; without a kernel name, on sys.executable.

        A kernel *name*, even "python3", is looked up through every kernelspec directory (JUPYTER_PATH,
        ~/.local/share/jupyter, the environment's, /usr/share), so it can start another Python than
        the one running qkit; ipykernel's built-in spec always names sys.executable.
        """

        @property
        def kernel_spec(self) -> KernelSpec:
            if self._kernel_spec is None:
                spec = (self.kernel_spec_manager.get_kernel_spec(kernel_name) if kernel_name
                        else KernelSpec(resource_dir=RESOURCES, **get_kernel_dict()))
                spec.env = {**spec.env, **_kernel_env(), **env}
                self._kernel_spec = spec
            return self._kernel_spec

        @default("transport_encryption")
        def _encrypt_where_possible(self) -> str:
            # ipykernel warns on every start of an unencrypted TCP kernel; CurveZMQ needs libsodium.
            return "auto" if zmq.has("curve") else "disabled"

    return ReportKernelManager


def _write_html(executed: Path, target: Path, record: dict, defaults: dict[str, str]) -> None:
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import Preprocessor
    from traitlets.config import Config

    class DropStderr(Preprocessor):
        """Warnings and progress bars reach the notebook as stderr streams; errors are kept."""

        def preprocess_cell(self, cell, resources, index):
            if "outputs" in cell:
                cell.outputs = [o for o in cell.outputs
                                if not (o.output_type == "stream" and o.get("name") == "stderr")]
            return cell, resources

    nb = nbformat.read(executed, as_version=4)
    # As an output, not a raw cell: nbconvert sanitizes raw HTML cells but renders outputs verbatim.
    header = nbformat.v4.new_output("display_data", data={"text/html": _header(record, defaults)})
    nb.cells.insert(0, nbformat.v4.new_code_cell(outputs=[header]))
    config = Config()
    config.HTMLExporter.exclude_input = True
    config.HTMLExporter.exclude_input_prompt = True
    config.HTMLExporter.exclude_output_prompt = True
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_cell_tags = {"injected-parameters"}
    exporter = HTMLExporter(config=config)
    exporter.register_preprocessor(DropStderr(), enabled=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": record["name"]}})
    _write_text_atomic(target, body)


def _header(record: dict, defaults: dict[str, str]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td><code>{e(k)}</code></td>"
        + (f"<td><code>{e(repr(record['params'][k]))}</code></td><td>set</td>" if k in record["params"]
           else f"<td><code>{e(v)}</code></td><td>default</td>")
        + "</tr>"
        for k, v in defaults.items())
    status = _status_html(record)
    error = f" <code>{e(record['error'])}</code>" if record["error"] else ""
    return (
        f'<div class="qkit-header" style="{_HEADER_STYLE}">'
        f"<h1>{e(record['name'])}</h1>"
        f"<p>Status: {status}{error}<br>"
        f"Run {e(record['started'])} in {record['seconds']:.1f} s, "
        f"qkit commit <code>{e(str(record['git_commit']))}</code></p>"
        + (f"<table><tr><th>parameter</th><th>value</th><th></th></tr>{rows}</table>" if rows else "")
        + "</div>"
    )


_HEADER_STYLE = "border:1px solid #ccc; border-radius:6px; padding:0.5em 1em; margin:1em 0"


_STATUS_STYLE = {"ok": "background:#2e7d32", "failed": "background:#c62828"}


def _status_html(record: dict) -> str:
    style = _STATUS_STYLE[record["status"]] + "; color:white; padding:0 0.4em; border-radius:3px"
    return f'<span class="qkit-status-{record["status"]}" style="{style}">{record["status"]}</span>'


def _update_index(out: Path, record: dict) -> None:
    index_json = out / "index.json"
    try:
        records = json.loads(index_json.read_text())
    except FileNotFoundError:
        records = {}
    except ValueError:
        # Written atomically, so this is a hand edit gone wrong; the reports themselves are intact.
        warnings.warn(f"{index_json} is not valid JSON; starting a new index")
        records = {}
    records[record["name"]] = record
    # A report whose HTML was deleted is no longer listed.
    records = {k: r for k, r in sorted(records.items()) if (out / r["html"]).exists()}
    write_json_atomic(index_json, records)
    _write_text_atomic(out / "index.html", _index_html(records))


def _index_html(records: dict[str, dict]) -> str:
    e = html.escape
    cards = []
    for name, r in records.items():
        summary = r.get("summary") or {}
        figure = summary.get("figure")
        found = (f"<p class=\"headline\">{e(summary['headline'])}</p>"
                 + (f"<p>best: <b>{e(summary['best'])}</b></p>" if summary.get("best") else "")
                 + f"<p>finding: {_finding_html(summary['status'])}</p>") if summary else (
            "<p><i>no summary: the notebook failed before publishing one</i></p>" if r["status"] == "failed"
            else "")
        cards.append(
            f"<div class=\"card\"><h2><a href=\"{e(r['html'])}\">{e(name)}</a> {_status_html(r)}</h2>"
            + (f" <code>{e(r['error'])}</code>" if r["error"] else "") + found
            + (f"<a href=\"{e(r['html'])}\"><img src=\"{e(figure)}\" alt=\"{e(name)}\"></a>" if figure else "")
            + f"<p class=\"meta\">{e(_params_text(r['params']))}; run {e(r['started'])} in {r['seconds']:.1f} s, "
            f"qkit commit <code>{e(str(r['git_commit']))}</code></p></div>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>qkit reports</title>
<style>body{{font-family:sans-serif; margin:2em; max-width:1200px}} .card{{border:1px solid #ccc;
border-radius:6px; padding:0.2em 1em 0.6em; margin:1em 0}} .card h2{{font-size:1.15em}}
.headline{{font-size:1.05em}} .meta{{color:#666; font-size:0.85em}} .card img{{max-width:100%;
max-height:340px}} code{{font-size:0.9em}}</style></head>
<body><h1>qkit reports</h1>
<p>Each study's headline, best variant and finding, from its own run; open a report for the tables,
figures and confidence intervals behind them.</p>
{"".join(cards)}
<p>Regenerate with <code>qkit report</code>.</p></body></html>
"""


_FINDING_STYLE = {"ok": "#2e7d32", "alert": "#c62828", "no effect resolved": "#8d6e00"}


def _finding_html(status: str) -> str:
    color = _FINDING_STYLE.get(status, "#c62828")
    return f'<span style="color:{color}; font-weight:bold">{html.escape(status)}</span>'


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items()) or "defaults"


def _write_text_atomic(path: Path, text: str) -> None:
    """Readers (a browser refreshing the index) see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
