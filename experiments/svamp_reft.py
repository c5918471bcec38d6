"""ReFT on SVAMP with the ReFT authors' files: N-CoT (``--cot nl``) or P-CoT (``--cot python``).

Same pipeline as `experiments.gsm8k_reft` (presets, ``--out``, ``--set``, resume);
data from ``../shared/data/reft`` (or ``REFTJAX_REFT_DIR``): ``svamp_nl.json`` /
``svamp_python_sdp.json`` for training, ``svamp_test_set.json`` for test.
P-CoT prompts start the program (``def solution():\\n    \"\"\"question\"\"\"``), the
grader runs it in the sandbox, and the KL coefficient is 0.01 as in the paper.

    python -m experiments.svamp_reft --cot python            # cpu preset, ~15 min
    python -m experiments.svamp_reft --cot nl --preset gpu --model DIR
"""
from __future__ import annotations

import dataclasses
import sys

from experiments import gsm8k_reft


def svamp_config(preset: str, cot: str, model: str | None):
    cfg = gsm8k_reft.preset_config(preset, model)
    python = cot == "python"
    data = dataclasses.replace(
        cfg.data, dataset="svamp-python" if python else "svamp-nl", test_dataset="svamp-test", test_split="test",
        prompt=dataclasses.replace(cfg.data.prompt, style="reft-python" if python else "reft"))
    rl = dataclasses.replace(cfg.rl, ppo=dataclasses.replace(cfg.rl.ppo, kl_coef=0.01 if python else 0.05))
    return dataclasses.replace(cfg, name=f"svamp_reft_{cot}_{preset}", data=data, rl=rl,
                               grader=(("type", "reft"), ("cot", cot)))


def main(argv=None) -> int:
    parser = gsm8k_reft.build_parser(
        "python -m experiments.svamp_reft",
        "ReFT on SVAMP (the ReFT authors' N-CoT or P-CoT data): SFT warm-up, then PPO against the answer "
        "grader (P-CoT programs run in the sandbox). Rerunning the same command resumes.", openai_job=False)
    parser.add_argument("--cot", choices=("nl", "python"), default="nl",
                        help="chain-of-thought kind: natural language (N-CoT) or Python program (P-CoT)")
    args = parser.parse_args(argv)
    return gsm8k_reft.run_cli(args, lambda preset, model=None: svamp_config(preset, args.cot, model))


if __name__ == "__main__":
    sys.exit(main())
