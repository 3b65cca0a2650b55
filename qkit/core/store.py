"""Content-addressed cache for everything qkit computes: float model copies, quantized checkpoints,
baseline logits and results.

An entry is a directory `<root>/<kind>/<key>/` where `key` hashes the spec that produced it (model,
method, recipe, calibration set, seed, ...) together with the versions of the libraries whose output it
is and the version of qkit's code that computes that kind (:class:`Kind`). The entry is built in a
temporary sibling directory and renamed into place only after a manifest with every file's size and
sha256 has been written, so a crash leaves no entry that looks complete.
A manifest that disagrees with the files (truncated copy, flipped bit, missing file) makes the entry
invalid: it is removed and rebuilt, never used. Once a process has hashed an entry, its files' stat is stamped
under ``<root>/.verified``, and later processes whose stat matches skip the hashing (:meth:`Store.verify`).

Many processes, on one machine or on every node of a cluster whose ``QKIT_CACHE`` is a shared path, may
use one store. Whoever builds an entry holds its lease, an flock on ``<root>/.locks/<kind>/<key>.lock``
(beside the entries, not among them): a second process that needs the entry meanwhile waits on the lease
and then reads what the first built, so nothing is built twice. The OS releases the lease of a builder that dies (on NFSv4 the server does once the dead
client stops renewing its lock lease, 90 s by default), and the next builder takes it over and removes the
dead one's ``.<key>.building.*`` directory; ``qkit cache clean`` removes those of every entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from qkit.core import provenance
from qkit.core.errors import QkitError

MANIFEST = "manifest.json"


CACHE_ENV = "QKIT_CACHE"
BUILDING = ".building."

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    """A kind of cached result and the version of the code that computes it: the one way qkit
    invalidates its cache after a code change. Each kind is declared once, beside the code that
    computes it; bump its version when that code would now give another result for the same spec.
    What the user brings (a task's YAML, a recipe, a data file) belongs in the spec by its content hash."""
    name: str
    version: int


def default_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "qkit"))


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see either the old file or the whole new one."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared and read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Store:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def key(self, kind: Kind, spec: dict) -> str:
        # Library versions belong to the key: the same recipe under another llm-compressor is another result.
        full = {"kind": kind.name, "version": kind.version, "spec": spec, "libraries": provenance.library_versions()}
        return hashlib.sha256(canonical(full).encode()).hexdigest()[:20]

    def path(self, kind: Kind, spec: dict) -> Path:
        return self.root / kind.name / self.key(kind, spec)

    def lookup(self, kind: Kind, spec: dict) -> Path | None:
        """The entry's directory if it is complete and intact. A damaged entry is left to the next builder,
        which removes it under the entry's lease."""
        path = self.path(kind, spec)
        return path if path.exists() and self.verify(path) else None

    # Hashing a 500 MB model costs about a second; an entry checked once in this process is not rehashed.
    _verified: set[tuple[str, int]] = set()

    @classmethod
    def verify(cls, path: Path) -> bool:
        """Whether the entry at `path` is complete and every file matches its manifest's size and sha256.

        A process hashes an entry once, then records each file's stat (size, mtime, ctime, inode) in the
        entry's stamp; a later process whose stat of every file matches the stamp skips the hashing, as
        git's index does. Rewriting a file, copying the store or restoring a file's mtime changes its ctime,
        so the stamp no longer matches and the entry is hashed again. Measured on a warm rerun of notebook
        01: 13 of its study's 32 s were this hashing.
        """
        try:
            stamp = (str(path), (path / MANIFEST).stat().st_mtime_ns)
        except OSError:
            return False
        if stamp in cls._verified:
            return True
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError):
            return False
        stats = _stats(path)
        if set(stats) != set(files) | {MANIFEST}:
            return False
        if _read_stamp(path) != stats:
            for rel, (size, digest) in files.items():
                if stats[rel][0] != size or _sha256(path / rel) != digest:
                    return False
            if max(max(s[1], s[2]) for s in stats.values()) <= time.time_ns() - _STAMP_AGE_NS:
                _write_stamp(path, stats)
        cls._verified.add(stamp)
        return True

    def get_dir(self, kind: Kind, spec: dict, build: Callable[[Path], dict | None]) -> Path:
        """Return the entry for `spec`, calling `build(tmpdir)` to create it if it is missing or damaged.

        `build` writes its files into the directory it is given and may return extra metadata, which is
        kept in the manifest beside the spec and the provenance of the run that built it. It runs under
        the entry's lease: another process asking for the entry meanwhile waits and then reads this one.
        """
        found = self.lookup(kind, spec)
        if found is not None:
            return found
        final = self.path(kind, spec)
        with self.lease(final):
            found = self.lookup(kind, spec)  # built by the holder this process waited for
            if found is not None:
                return found
            # Under the lease, a building directory of this entry is a dead builder's; so is damage.
            for leftover in self.leftovers(final):
                shutil.rmtree(leftover, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{BUILDING}"))
            tmp.chmod(0o755)  # mkdtemp makes it private; a cache is shared by whoever can read its root
            try:
                started = time.time()
                meta = build(tmp) or {}
                files = {
                    str(p.relative_to(tmp)): (p.stat().st_size, _sha256(p))
                    for p in sorted(tmp.rglob("*"))
                    if p.is_file() and p.name != MANIFEST
                }
                manifest = {
                    "kind": kind.name,
                    "version": kind.version,
                    "key": final.name,
                    "spec": spec,
                    "meta": meta,
                    "build_seconds": round(time.time() - started, 3),
                    "provenance": provenance.collect(),
                    "files": files,
                }
                write_json_atomic(tmp / MANIFEST, manifest)
                os.replace(tmp, final)
                # The builder has just hashed these files and nobody else writes them, so it may stamp
                # them young. Otherwise the first warm run after a cold one hashes every entry: at --jobs 2
                # that run took 74 s for the whole suite and the runs after it 48 s.
                _write_stamp(final, _stats(final))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return final

    @contextmanager
    def lease(self, entry: Path) -> Iterator[None]:
        """Hold the lease of the entry at `entry` (``self.path(kind, spec)``), waiting while another process
        holds it. A store that this process cannot write is a QkitError."""
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            _lock_path(entry).parent.mkdir(parents=True, exist_ok=True)
            lock = _lock(entry)
            try:
                lock.acquire(blocking=False)
            except Timeout:
                log.warning("%s is being built by %s; waiting for it", entry, _holder(entry))
                lock.acquire()
        except OSError as e:
            raise QkitError(f"cannot write the store at {self.root} ({e.strerror or e})",
                            f"point {CACHE_ENV} at a folder that every worker can write (on a cluster, "
                            "a path all nodes share)") from None
        try:
            yield
        finally:
            lock.release()

    @staticmethod
    def leftovers(entry: Path) -> list[Path]:
        """The building directories of `entry`: its live builder's, or dead builders' ones."""
        return sorted(entry.parent.glob(f".{entry.name}{BUILDING}*"))

    def clean(self) -> list[Path]:
        """Remove the building directories whose builder is gone (no process holds their entry's lease);
        returns what was removed."""
        removed = []
        for leftover in sorted(self.root.glob(f"*/.*{BUILDING}*")):
            entry = leftover.parent / leftover.name[1:].split(BUILDING)[0]
            lock = _lock(entry)
            try:
                lock.acquire(blocking=False)
            except Timeout:
                continue  # being built right now
            try:
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
            finally:
                lock.release()
        return removed

    def usage(self) -> dict[str, tuple[int, int]]:
        """Entries and bytes on disk per kind, building directories included in the bytes."""
        out = {}
        for kind in sorted(p for p in self.root.glob("*") if p.is_dir() and not p.name.startswith(".")):
            entries = sum(1 for p in kind.iterdir() if p.is_dir() and not p.name.startswith("."))
            size = sum(f.lstat().st_size for f in kind.rglob("*") if f.is_file() and not f.is_symlink())
            out[kind.name] = (entries, size)
        return out

    def get_json(self, kind: Kind, spec: dict, compute: Callable[[], Any]) -> Any:
        """A JSON-serialisable result, computed once per spec."""
        def build(tmp: Path) -> None:
            write_json_atomic(tmp / "result.json", compute())

        return json.loads((self.get_dir(kind, spec, build) / "result.json").read_text())

    def get_items(self, kind: Kind, spec: dict, ids: Sequence[str],
                  compute: Callable[[list[str]], dict[str, Any]], *, batch: int = 16) -> dict[str, Any]:
        """Per-item results (e.g. one task item's score), kept in one JSON file per spec.

        Only ids missing from the file are computed, `batch` at a time, and the file is rewritten
        atomically after each batch: adding items or resuming an interrupted run computes only the rest.
        An unreadable file is set aside as ``items.json.bad`` and its items recomputed. Two processes asking
        for one spec's items take turns under its lease.
        """
        entry = self.path(kind, spec)
        path = entry / "items.json"
        # The whole call under the lease: a second writer waits, then finds these items done.
        with self.lease(entry):
            done: dict[str, Any] = {}
            if path.exists():
                try:
                    done = json.loads(path.read_text())["items"]
                except (OSError, ValueError, KeyError, TypeError):
                    os.replace(path, path.with_suffix(".json.bad"))
            missing = [i for i in dict.fromkeys(ids) if i not in done]
            for start in range(0, len(missing), batch):
                part = missing[start:start + batch]
                new = compute(part)
                absent = [i for i in part if i not in new]
                if absent:
                    raise RuntimeError(f"{kind.name}: compute() returned no result for {absent[:3]}")
                done.update({i: new[i] for i in part})
                write_json_atomic(path, {"kind": kind.name, "version": kind.version, "spec": spec,
                                         "provenance": provenance.collect(), "items": done})
            return {i: done[i] for i in ids}

    def has_items(self, kind: Kind, spec: dict, ids: Sequence[str]) -> bool:
        """Whether :meth:`get_items` would find every one of `ids` without computing."""
        try:
            done = json.loads((self.path(kind, spec) / "items.json").read_text())["items"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return all(i in done for i in ids)

    @staticmethod
    def manifest(path: Path) -> dict:
        return json.loads((Path(path) / MANIFEST).read_text())


def _lock(entry: Path) -> FileLock:
    # Who holds it, for a waiter's message; the flock, not this text, is the lease.
    def holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)

    return FileLock(_lock_path(entry), on_acquired=holder)


def _stats(entry: Path) -> dict[str, list[int]]:
    """Each file of the entry (its manifest included) by relative path: size, mtime, ctime, inode."""
    return {str(p.relative_to(entry)): [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            for p in entry.rglob("*") if p.is_file() and (st := p.stat())}


# A file changed within the filesystem's timestamp tick of being stamped could keep its stat; a reader does
# not stamp files this young, so they are hashed again next time (git's "racily clean" rule).
_STAMP_AGE_NS = 2_000_000_000


def _stamp_path(entry: Path) -> Path:
    """An entry's verification stamp, kept beside its lease, out of the entry (which holds its manifest's
    files only)."""
    return entry.parent.parent / ".verified" / entry.parent.name / f"{entry.name}.json"


def _read_stamp(entry: Path) -> dict | None:
    try:
        return json.loads(_stamp_path(entry).read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(entry: Path, stats: dict[str, list[int]]) -> None:
    try:
        write_json_atomic(_stamp_path(entry), stats)
    except OSError:
        pass  # a store this process may read but not write: it hashes again next time


def _lock_path(entry: Path) -> Path:
    """An entry's lease file, kept out of its kind's folder, which holds entries (and their builds) only."""
    return entry.parent.parent / ".locks" / entry.parent.name / f"{entry.name}.lock"


def _holder(entry: Path) -> str:
    try:
        return _lock_path(entry).read_text() or "another process"
    except OSError:
        return "another process"
