"""A model-based grader end to end: `python -m reftjax.serve` serves a judge, README's grader
(`experiments/graders/same_number_judge.json`, a `label_model`) asks it about GSM8K answers; prints one JSON line.

Run: `python bench/judge.py [--model default] [--items 32] [--batch-size 8]` (needs ../shared/data). Each of the first
`--items` GSM8K test questions is graded twice: with its gold answer ("The answer is X.") and with a wrong one (X + 3).
Reports the replies per second through the HTTP endpoint once warm (a second pass over the same requests; the first
pass's time, compiles included, apart), the share of replies that were a label, the mean scores of right and wrong
answers, and how often the right answer of a pair scored higher: how well this judge judges, which a small model does
poorly.
"""
import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

from reftjax.graders import build_grader
from reftjax.graders.base import is_fault
from reftjax.host import cpu_description

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
GRADER = ROOT / "experiments" / "graders" / "same_number_judge.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def judge_figures(grades: list, again: list, first_s: float, warm_s: float) -> dict:
    """The keys from the two passes over the 2n requests (the n right answers, then the same n items' wrong ones):
    replies/s of the warm (second) pass, the share of grades that were not a grader fault, the mean scores of the
    right and of the wrong halves, the shares of pairs whose right answer scored higher and the same, whether the
    passes agreed."""
    n = len(grades) // 2
    scored = [not is_fault(g) for g in grades]
    right, wrong = [g.score for g in grades[:n]], [g.score for g in grades[n:]]
    return {"first_pass_s": round(first_s, 2), "warm_pass_s": round(warm_s, 2),
            "replies_per_s": round(2 * n / warm_s, 2), "scored_share": sum(scored) / (2 * n),
            "same_grades_twice": [g.to_json() for g in grades] == [g.to_json() for g in again],
            "mean_score_right": sum(right) / n, "mean_score_wrong": sum(wrong) / n,
            "right_above_wrong": sum(a > b for a, b in zip(right, wrong)) / n,
            "ties": sum(a == b for a, b in zip(right, wrong)) / n,
            "example_error": next((g.error for g in grades if g.error), None)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:args.items]]
    items = [{"question": r["question"], "answer_value": r["answer"].rsplit("####", 1)[1].strip().replace(",", "")}
             for r in rows]
    texts = [f"The answer is {it['answer_value']}." for it in items] + \
            [f"The answer is {int(float(it['answer_value'])) + 3}." for it in items]
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    server = subprocess.Popen([sys.executable, "-m", "reftjax.serve", "--model", args.model, "--name", "judge",
                               "--port", str(port), "--batch-size", str(args.batch_size),
                               "--max-new-tokens", "8", "--prompt-buckets", "128,256"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        t0 = time.perf_counter()
        line = server.stdout.readline()  # "serving judge at ..." once loaded
        if not line.startswith("serving"):
            raise SystemExit(f"the server did not start (exit {server.wait()})")
        load_s = time.perf_counter() - t0
        grader = build_grader({**json.loads(GRADER.read_text()), "base_url": f"http://127.0.0.1:{port}/v1",
                               "max_concurrency": args.batch_size})
        all_items = items + items
        t0 = time.perf_counter()
        grades = grader.grade_batch(all_items, texts)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = grader.grade_batch(all_items, texts)
        warm_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=60)
    n = len(items)
    print(json.dumps({
        "model": args.model, "items": n, "requests": 2 * n, "batch_size": args.batch_size,
        "server_load_s": round(load_s, 2), **judge_figures(grades, again, first_s, warm_s),
        "cpu": cpu_description()}))


if __name__ == "__main__":
    main()
