"""An OpenAI reinforcement fine-tuning job, as reftjax settings.

OpenAI RFT takes a job (the body of `POST /v1/fine_tuning/jobs`): a training and a validation file of `messages` +
reference fields, a grader, and hyperparameters. `python -m experiments.gsm8k_reft --openai-job job.json` reads the
same JSON and runs it here; `--model`, `--seed` and `--set` given on the command line win over the job:

    job field                                  reftjax setting
    training_file, validation_file             data.train_file, data.val_file (local JSONL paths, relative to the
                                               job file's folder; OpenAI file ids are refused), and data.test_file =
                                               the validation file (a job has no test split: the test figures are then
                                               validation figures; --set data.test_file=... names a held-out file; a
                                               --set data.val_file leaves the test split on the job's file). A job
                                               without a validation file is refused unless --set data.test_file names
                                               one (the test split would be GSM8K's); its validation split is then
                                               held out of the training file (data.val_fraction)
    (implied)                                  data.train_format="openai", data.prompt.style="chat" (the messages
                                               through the model's chat template), sft.epochs=0 (no warm-up: RL from
                                               the loaded model, as OpenAI's RFT starts from the base model),
                                               data.n_train / n_val / n_test = null: the files whole (the cpu
                                               preset's caps are for its GSM8K demo), and rl.early_stop_patience=0
                                               (every epoch runs; the gpu/tpu presets stop after 5 validations
                                               without a gain)
    model                                      --model (a Hugging Face id, or a path: read from the job file's folder
                                               when it is there, else passed as written, a hub id or a path from the
                                               working directory; an OpenAI model name is refused unless --model
                                               names the checkpoint)
    seed                                       seed
    suffix                                     name (the run's folder: runs/<suffix>)
    method.reinforcement.grader                grader (string_check, text_similarity, python, score_model,
                                               label_model, multi; see README)
    hyperparameters.batch_size                 rl.prompts_per_iteration (refused when larger than the training
                                               examples: an epoch would hold no batch)
    hyperparameters.n_epochs                   rl.epochs: n_epochs x (training prompts // batch size) RL
                                               iterations, the RL loader's full batches, counted on the prompts the
                                               tokenizer's length limits keep
    hyperparameters.learning_rate_multiplier   rl.optim.learning_rate x the multiplier (the preset's; a --set
                                               learning rate is used as given)
    hyperparameters.eval_interval              rl.eval_every

For example (train.jsonl and val.jsonl beside the job file; `python -m experiments.gsm8k_reft --openai-job job.json
--model HuggingFaceTB/SmolLM2-360M-Instruct`):

    {"model": "o4-mini-2025-04-16", "training_file": "train.jsonl", "validation_file": "val.jsonl", "seed": 42,
     "method": {"type": "reinforcement", "reinforcement": {
       "grader": {"type": "string_check", "name": "exact", "operation": "eq",
                  "input": "{{sample.output_text}}", "reference": "{{item.reference_answer}}"},
       "hyperparameters": {"n_epochs": 2, "batch_size": 16, "eval_interval": 5, "learning_rate_multiplier": 1}}}}

"auto" (or a field left out) keeps the preset's value. `compute_multiplier` other than 1, `eval_samples`,
`reasoning_effort` other than "default", a `response_format` and `integrations` have no reftjax counterpart that
means the same: they are refused with the settings to use instead (`rl.sampling.n` / `rl.ppo.group_size`;
`eval.voting_k`; `data.prompt.chat_template_kwargs`; TensorBoard and metrics.jsonl are always written), so a job
never runs as something it did not ask for. `metadata` is ignored (labels only), as are `null` fields.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from reftjax.config import DuplicateName, unique_names

_TOP = {"model", "training_file", "validation_file", "seed", "suffix", "method", "metadata", "integrations",
        "hyperparameters"}
_REINFORCEMENT = {"grader", "hyperparameters", "response_format"}
# the settings a job's fields set, for errors in them (the implied ones have no field)
_FIELDS = {"data.train_file": "training_file", "data.val_file": "validation_file", "data.test_file": "validation_file",
           "grader": "method.reinforcement.grader", "name": "suffix", "seed": "seed",
           "rl.prompts_per_iteration": "method.reinforcement.hyperparameters.batch_size",
           "rl.eval_every": "method.reinforcement.hyperparameters.eval_interval"}
_HYPER = {"batch_size", "n_epochs", "learning_rate_multiplier", "eval_interval", "eval_samples",
          "compute_multiplier", "reasoning_effort"}
# OpenAI's hosted model names (and fine-tuned ones, "ft:..."): not checkpoints reftjax can load
_OPENAI_MODEL = re.compile(r"^(ft:|gpt-|o\d|chatgpt-|davinci|babbage|text-|codex-)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Job:
    """A job read by `read_job`: `sets` are `--set` items (PATH=JSON) to apply before the command line's own;
    `model`, `seed`: the job's (None: not given); `n_epochs`, `lr_multiplier`: applied by `apply_epochs_and_lr` to
    the resolved config (None: "auto" or not given)."""

    path: str
    sets: tuple[str, ...]
    model: str | None = None
    seed: int | None = None
    n_epochs: int | None = None
    lr_multiplier: float | None = None
    batch_size: int | None = None
    has_validation: bool = True

    def model_for(self, given: str | None) -> str | None:
        """The checkpoint to train: `given` (--model) when set, else the job's `model` (a path found from the job
        file's folder is made absolute by `job_settings`), which must then be one reftjax can load: an OpenAI model
        name that is no local path is refused (the job keeps it when --model names the checkpoint)."""
        if given is not None or self.model is None:
            return given
        if _OPENAI_MODEL.match(self.model) and not os.path.exists(os.path.expanduser(self.model)):
            raise JobError(f"{self.path}: model: {json.dumps(self.model)} is an OpenAI model; reftjax trains open "
                           f"checkpoints: give a Hugging Face id or path (here or with --model)")
        return self.model

    def explain(self, message: str) -> str:
        """`message` (a config error from the job's settings alone) naming the job file and, where the message
        names a setting the job set, the job's field for it."""
        message = message.removeprefix("--set: ")
        found = [(message.find(s), f) for s, f in _FIELDS.items() if s in message]
        field = min(found)[1] if found else None
        return f"{self.path}: {field + ': ' if field else ''}{message}"


class JobError(ValueError):
    """A job file reftjax cannot run as written; the message names the file and the field."""


def _non_finite(obj, where: str) -> tuple[str, float] | None:
    """(path, value) of the first NaN or Infinity in `obj` (Python's json reads them; they reached the grader's
    settings as a string and were refused as "expected an object such as {"type": "reft"}")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        if (found := _non_finite(v, f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]")) is not None:
            return found
    return None


def read_job(path: str) -> Job:
    """The job at `path` (a JSON object, as sent to OpenAI's fine-tuning jobs endpoint) as reftjax settings."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise JobError(f"{path}: cannot read the job file (--openai-job): {e.strerror or e}") from None
    try:
        job = json.loads(text, object_pairs_hook=unique_names)
    except json.JSONDecodeError as e:
        raise JobError(f"{path}:{e.lineno}:{e.colno}: not JSON ({e.msg})") from None
    except DuplicateName as e:
        raise JobError(f"{path}: {e}") from None
    if not isinstance(job, dict):
        raise JobError(f"{path}: a job is a JSON object (the body of POST /v1/fine_tuning/jobs), got "
                       f"{type(job).__name__}")
    return job_settings(job, path)


def job_settings(job: dict, path: str) -> Job:
    """`job` (a parsed job object) as a `Job`; `path` is the file it came from (relative data paths are read from its
    folder, and every error names it)."""
    def fail(field: str, msg: str):
        raise JobError(f"{path}: {field}: {msg}")

    def known(obj, allowed: set, where: str) -> dict:
        if not isinstance(obj, dict):
            fail(where, f"expected an object, got {json.dumps(obj)}")
        for k in obj:
            if k not in allowed:
                fail(f"{where}.{k}" if where else k, f"not a field reftjax reads here (it reads {sorted(allowed)})")
        return {k: v for k, v in obj.items() if v is not None}

    top = known(job, _TOP, "")
    method = top.get("method")
    if method is None:
        fail("method", 'missing: reftjax runs reinforcement jobs ({"type": "reinforcement", "reinforcement": '
                       '{"grader": ..., "hyperparameters": ...}})')
    method = known(method, {"type", "reinforcement", "supervised", "dpo"}, "method")
    if method.get("type") != "reinforcement":
        fail("method.type", f"{json.dumps(method.get('type'))}: reftjax runs \"reinforcement\" jobs (its SFT "
                            f"warm-up is the sft.* settings of a ReFT run; DPO is not offered)")
    rft = known(method.get("reinforcement", {}), _REINFORCEMENT, "method.reinforcement")
    if "hyperparameters" in top:
        fail("hyperparameters", "the top-level field is OpenAI's deprecated one; put them in "
                                "method.reinforcement.hyperparameters")
    if "integrations" in top and top["integrations"] != []:
        fail("integrations", "not offered: reftjax writes TensorBoard (OUT/tensorboard) and OUT/metrics.jsonl")
    if "response_format" in rft:
        fail("method.reinforcement.response_format", "structured outputs are not offered: ask for the JSON in the "
                                                     "prompt and read it with {{sample.output_json.x}} in the grader")
    hyper = known(rft.get("hyperparameters", {}), _HYPER, "method.reinforcement.hyperparameters")
    hyper = {k: v for k, v in hyper.items() if v != "auto"}
    where = "method.reinforcement.hyperparameters."

    def count(name: str, low: int = 1) -> int | None:
        v = hyper.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            fail(where + name, f"expected an integer >= {low} or \"auto\", got {json.dumps(v)}")
        return v

    sets: list[tuple[str, object]] = [("data.train_format", "openai"), ("data.prompt.style", "chat"),
                                      ("sft.epochs", 0), ("data.n_train", None), ("data.n_val", None),
                                      ("data.n_test", None), ("rl.early_stop_patience", 0)]
    base = os.path.dirname(os.path.abspath(path))
    for field, settings in (("training_file", ("data.train_file",)),
                            ("validation_file", ("data.val_file", "data.test_file"))):
        f = top.get(field)
        if f is None:
            if field == "training_file":
                fail(field, "missing: the JSONL of messages + reference fields to train on")
            continue
        if not isinstance(f, str) or not f:
            fail(field, f"expected a file path, got {json.dumps(f)}")
        local = os.path.normpath(os.path.join(base, os.path.expanduser(f)))
        if not os.path.isfile(local):
            hint = (" (an OpenAI file id: download the file with the Files API and give its path)"
                    if re.fullmatch(r"file-\w+", f) else "")
            fail(field, f"{f}: no such file{hint}")
        sets += [(s, local) for s in settings]
    if "suffix" in top:
        sets.append(("name", top["suffix"]))
    if "grader" in rft:
        if (at := _non_finite(rft["grader"], "method.reinforcement.grader")) is not None:
            fail(at[0], f"{json.dumps(at[1])} is not a number a job can hold (JSON has no NaN or Infinity)")
        sets.append(("grader", rft["grader"]))
    for name, setting in (("batch_size", "rl.prompts_per_iteration"), ("eval_interval", "rl.eval_every")):
        if count(name) is not None:
            sets.append((setting, hyper[name]))
    n_epochs = count("n_epochs")
    lr = hyper.get("learning_rate_multiplier")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf")):
        fail(where + "learning_rate_multiplier", f"expected a number > 0 or \"auto\", got {json.dumps(lr)}")
    cm = hyper.get("compute_multiplier")
    if cm is not None and cm != 1:
        fail(where + "compute_multiplier", f"{json.dumps(cm)}: no counterpart that means the same; the samples drawn "
                                           f"per prompt are rl.sampling.n (PPO) or rl.ppo.group_size (GRPO/RLOO)")
    if "eval_samples" in hyper:
        fail(where + "eval_samples", f"{json.dumps(hyper['eval_samples'])}: no counterpart that means the same; "
                                     f"reftjax validates greedy answers (top-1) and majority votes over "
                                     f"eval.voting_k samples per question")
    if hyper.get("reasoning_effort", "default") != "default":
        fail(where + "reasoning_effort", f"{json.dumps(hyper['reasoning_effort'])}: not offered; a chat template's "
                                         f"own switches (Qwen3's enable_thinking) are data.prompt.chat_template_kwargs")
    model = top.get("model")
    if model is not None and not isinstance(model, str):
        fail("model", f"expected a Hugging Face id or path, got {json.dumps(model)}")
    if model and os.path.exists(os.path.join(base, os.path.expanduser(model))):  # a path, as the data files are read
        model = os.path.normpath(os.path.join(base, os.path.expanduser(model)))
    seed = top.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        fail("seed", f"expected an integer from 0 to 2**32 - 1, got {json.dumps(seed)}")
    return Job(path, tuple(f"{k}={json.dumps(v)}" for k, v in sets), model, seed, n_epochs,
               None if lr is None else float(lr), hyper.get("batch_size"), "validation_file" in top)


def apply_epochs_and_lr(cfg, job: Job, given: set, n_train: int | None, began: dict | None = None):
    """`cfg` with the job's `n_epochs` (`rl.epochs`) and `learning_rate_multiplier` applied, unless the command
    line's --set names rl.iterations or rl.epochs / rl.optim.learning_rate (`given`), which win. `n_train`: the
    training examples, counted when the job sets `n_epochs` or `batch_size`: a batch larger than them is refused here.
    `began`: the config.json of a run already in the output folder; one begun before `rl.epochs` (none there, or
    null) keeps its `rl.iterations` = n_epochs x (n_train // batch size), so the same command still resumes it."""
    import logging

    from reftjax.config import replace_paths

    paths = {}
    b = cfg.rl.prompts_per_iteration
    if n_train is not None and n_train < b:  # (found when RL starts, after the model loads, naming the setting)
        if b == job.batch_size:
            raise JobError(f"{job.path}: method.reinforcement.hyperparameters.batch_size: an epoch of {n_train} "
                           f"training examples holds no batch of {b} prompts (rl.prompts_per_iteration)")
        raise ValueError(f"rl.prompts_per_iteration={b} (--set, or the preset's where the job sets no batch_size): "
                         f"an epoch of the job's {n_train} training examples holds no batch of {b} prompts")
    if job.n_epochs is not None and not given & {"rl.iterations", "rl.epochs"}:
        if isinstance(began, dict) and isinstance(began.get("rl"), dict) and began["rl"].get("epochs") is None:
            # (begun before rl.epochs, config.json then lacked it; once resumed, it holds its default, null)
            paths["rl.iterations"] = job.n_epochs * (n_train // b)  # counted on the file's examples, as it began
            logging.getLogger("reftjax.cli").info(
                "rl.iterations=%d: n_epochs x (%d training examples // %d), as the run in the output folder began "
                "(before rl.epochs, which counts the prompts the length limits keep)", paths["rl.iterations"],
                n_train, b)
        else:
            paths["rl.epochs"] = job.n_epochs
    if job.lr_multiplier is not None and "rl.optim.learning_rate" not in given:
        paths["rl.optim.learning_rate"] = cfg.rl.optim.learning_rate * job.lr_multiplier
    return replace_paths(cfg, paths) if paths else cfg
