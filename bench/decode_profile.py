"""Where a decode step's time goes: per-op profile of `rollout` on SmolLM2-135M.

    python bench/decode_profile.py [--batch 32] [--new-tokens 64] [--prompt-len 160]

Runs one greedy rollout (forced length, GSM8K chat prompts) under
`jax.profiler.trace`, reads the Perfetto trace, keeps the XLA ops that ran once
per decode step (the while-loop body), and groups them by the `op_name` of their
HLO instruction (e.g. `mlp/...dot_general`, `bkgd,bkds->bkgs/dot_general`).
Prints one JSON line: milliseconds per step per group (thread-summed op time),
the total, and the load average. Durations are wall time of each op on its
thread; run it on an idle machine.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pathlib  # noqa: E402

import jax  # noqa: E402

import reftjax.rollout as ro  # noqa: E402
from reftjax.hf import load_model  # noqa: E402
from reftjax.host import cpu_description  # noqa: E402


def _op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> short op_name (jit prefix and layer scopes stripped)."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ [\w-]+\(", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            name = op.group(1) if op else ""
            name = re.sub(r"^jit\([^)]*\)/(while/body/)?", "", name)
            out[m.group(1)] = name
    return out


def step_ms_by_group(events: list[dict], names: dict[str, str], n: int) -> dict[str, float]:
    """Milliseconds per decode step of each op_name group: the complete ("X") trace events of the HLO ops in
    `names` that ran exactly `n` times (once per decode step: the loop body, n steps incl. the last), their
    durations (microseconds) summed over threads and divided by `n`; an op without an op_name is its own group."""
    per_op = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X":
            per_op[e["name"]][0] += 1
            per_op[e["name"]][1] += e.get("dur", 0.0)
    groups = collections.defaultdict(float)
    for op, (count, us) in per_op.items():
        if count == n and op in names:
            groups[names[op] or op] += us / 1e3 / n
    return dict(groups)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=160)
    ap.add_argument("--top", type=int, default=15, help="groups to list")
    args = ap.parse_args(argv)

    model = load_model("default")
    path = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    questions = [json.loads(line)["question"] for line in open(path)][: args.batch]
    ids = ro.encode_prompts(model.tokenizer, questions, chat=True)
    tokens, mask = ro.left_pad(ids, args.prompt_len, 0)
    n = args.new_tokens
    cfg = ro.SamplingConfig(max_new_tokens=n, greedy=True, eos_ids=())

    def run():
        return jax.block_until_ready(ro.rollout(model.params, tokens, mask, jax.random.key(0),
                                                model_cfg=model.config, cfg=cfg))

    run()  # compile
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            run()
        trace = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    hlo = ro._rollout_jit.lower(model.params, tokens, mask, jax.random.key(0), None, model_cfg=model.config,
                                cfg=cfg, packed_prefill=True).compile().as_text()
    groups = step_ms_by_group(events, _op_names(hlo), n)
    top = dict(sorted(((k, round(v, 2)) for k, v in groups.items()), key=lambda kv: -kv[1])[: args.top])
    print(json.dumps({"batch": args.batch, "new_tokens": n, "prompt_len": args.prompt_len,
                      "cache_len": args.prompt_len + n, "step_ms_total": round(sum(groups.values()), 1),
                      "step_ms_by_op": top, "load_avg_1m": round(os.getloadavg()[0], 2),
                      "cpu": cpu_description()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
