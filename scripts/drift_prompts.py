"""Write qkit/datafiles/drift_prompts.jsonl: the prompts `qkit drift replay` serves by default.

64 requests, 16 per tag, interleaved, one a minute from 2026-11-01 00:00 UTC: BIG-bench arithmetic
questions (4-shot, as qkit_arithmetic asks them; checkable), HumanEval prompts (checkable by their tests
in qkit's sandbox), and the openings of held-out prose paragraphs and chats from qkit's evaluation texts.
"""
import json

from qkit import data
from qkit.data.request_log import SAMPLE_PROMPTS
from qkit.evaluation.tasks import items

PER_TAG, START, CHARS = 16, 1793491200, 400  # 2026-11-01T00:00:00Z; openings cut to 400 characters


def main() -> None:
    shots = "".join(f"Q: {r['question']}\nA: {r['answer']}\n\n" for r in items.arithmetic("fewshot"))
    test = items.arithmetic("test")
    arithmetic = [{"tag": "arithmetic", "prompt": f"{shots}Q: {r['question']}\nA:", "check": "arithmetic",
                   "answer": r["answer"]} for r in test[::len(test) // PER_TAG][:PER_TAG]]
    problems = items.humaneval()
    code = [{"tag": "code", "prompt": p["prompt"], "check": "humaneval", "test": p["test"],
             "entry_point": p["entry_point"]} for p in problems[::len(problems) // PER_TAG][:PER_TAG]]
    paragraphs = [p for d in data.documents("prose", "heldout") for p in d.split("\n\n") if len(p) >= CHARS // 2]
    prose = [{"tag": "prose", "prompt": p[:CHARS]} for p in paragraphs[::len(paragraphs) // PER_TAG][:PER_TAG]]
    chat = [{"tag": "chat", "prompt": d[:CHARS]} for d in data.documents("chat", "heldout")[:PER_TAG]]
    rows = [r for group in zip(arithmetic, prose, code, chat) for r in group]
    with open(SAMPLE_PROMPTS, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"timestamp": START + 60 * i, **r}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
