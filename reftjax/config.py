"""ExperimentConfig: one frozen, nested, JSON-serialisable description of a ReFT run.

Every sub-config is a frozen dataclass (hashable, usable as a jit static
argument). `to_dict`/`from_dict` round-trip through JSON so a run directory's
`config.json` fully describes the run and resume can check it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Any

from reftjax.data import DATASETS, PromptConfig, TokenizeConfig
from reftjax.data.records import FORMATS
from reftjax.evaluate import EvalConfig
from reftjax.graders.build import build_grader
from reftjax.graders.guards import GuardConfig
from reftjax.rerank import RerankConfig
from reftjax.rollout import SamplingConfig
from reftjax.sharding import MeshConfig
from reftjax.steps import OptimConfig, PPOConfig


def check_key_seed(name: str, seed: int) -> None:
    """Refuse a seed of 2**32 or more: `jax.random.key` keeps its low 32 bits, so such a seed would sample exactly as
    a smaller one (2**32 + 5 as 5) while NumPy's data order differed, and 2**64 failed only once the run used it."""
    if seed >= 2**32:
        raise ValueError(f"{name} must be < 2**32 (a JAX PRNG key keeps its low 32 bits: {seed} would sample as "
                         f"{seed % 2**32}), got {seed}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Attributes:
      dataset: `reftjax.data.DATASETS` name for training (e.g. "gsm8k", "svamp-nl").
      test_dataset: held-out test set name and split ("gsm8k" + test_split).
      train_file/train_format: a file instead of `dataset` (reft | openai | gsm8k-jsonl). An `openai`
        file (RFT prompts with reference fields) has no chain of thought to imitate: train it with
        `sft.epochs=0` (RL from the loaded model, as OpenAI RFT does).
      answer_field: `openai` files only: the field holding a numeric reference answer, which becomes
        the items' `answer_value` (what the ReFT grader reads); other fields reach graders as they are.
      val_file, test_file: files in `train_format` (with `train_file` only) for the validation and test splits,
        as OpenAI RFT takes a validation file: with `val_file` the training file is used whole (in file order;
        `val_fraction` and `seed` are not read), with `test_file` `test_dataset`/`test_split` are not read.
      n_train: use the first n training examples after the split (None: all).
      n_val, n_test: evaluation subset sizes (None: all).
      val_fraction: share of the training file held out for validation (model selection).
      seed: split seed.
    """

    dataset: str = "gsm8k"
    test_dataset: str = "gsm8k"
    test_split: str = "test"
    train_file: str | None = None
    train_format: str | None = None
    answer_field: str | None = None
    val_file: str | None = None
    test_file: str | None = None
    n_train: int | None = None
    n_val: int | None = 64
    n_test: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    prompt: PromptConfig = PromptConfig()
    tokenize: TokenizeConfig = TokenizeConfig()

    def __post_init__(self):
        for name in ("n_train", "n_val", "n_test"):  # 0 read as "all" (falsy) before this check
            n = getattr(self, name)
            if n is not None and n < 1:
                raise ValueError(f"data.{name} must be >= 1 or null (all), got {n}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        # the names are checked here, not after the model's weights load (a traceback, minutes in at 7B)
        if self.train_file is None:
            if self.train_format is not None:
                raise ValueError(f"data.train_format={self.train_format!r} is the format of data.train_file, "
                                 f"which is not set (data.dataset={self.dataset!r} is read; set both at once: --set "
                                 f"both, or config.replace_paths)")
            if self.dataset not in DATASETS:
                raise ValueError(f"data.dataset must be one of {DATASETS} (or set data.train_file), got "
                                 f"{self.dataset!r}")
        elif self.train_format not in FORMATS:
            raise ValueError(f"data.train_file needs data.train_format, one of {FORMATS}; got {self.train_format!r} "
                             f"(set both at once: --set both, or config.replace_paths)")
        for name in ("val_file", "test_file"):
            if getattr(self, name) is not None and self.train_file is None:
                raise ValueError(f"data.{name} is read in data.train_format, the format of data.train_file, which "
                                 f"is not set (set data.train_file and data.train_format too)")
        if self.answer_field is not None and self.train_format != "openai":
            raise ValueError(f"data.answer_field is read from openai-format train files only (data.train_format="
                             f"{self.train_format!r})")
        if self.test_dataset not in DATASETS:
            raise ValueError(f"data.test_dataset must be one of {DATASETS}, got {self.test_dataset!r}")
        if self.test_split not in ("train", "test"):
            raise ValueError(f"data.test_split must be 'test' or 'train' (GSM8K's splits), got {self.test_split!r}")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """SFT warm-up. ReFT: 2 epochs warm-up (10 for 125M models), lr 1e-5 (2e-5 for 125M), batch 48.

    schedule_epochs: the learning-rate schedule is sized for this many epochs while training stops
      after `epochs` (None: `epochs`). The authors' warm-up checkpoint is epoch 2 (7B) or 10 (125M)
      of a 40-epoch SFT run (lqtrung1998/mwp_ReFT `exps/paper_exps/SFT`, `global_step_312_epoch_2`),
      so its lr was still warming up (7B) or barely decayed: `schedule_epochs=40` reproduces that.
    group_by_length: k > 0 sorts each window of k batches by length (`LoaderConfig`): less padding, but each batch
      is one equally weighted step, so a token of a batch of short examples weighs more than under a plain shuffle
      (GSM8K, batch 48: the shortest quarter's tokens ~1.7x a plain token mean's weight, the longest ~0.7x). 0 is
      the authors' plain shuffle (the `paper` preset).
    """

    epochs: int = 2
    schedule_epochs: int | None = None
    batch_size: int = 48
    accum_steps: int = 1
    optim: OptimConfig = OptimConfig()
    group_by_length: int = 16
    # rows (batch x positions) per chunk of the fused head + cross-entropy; 0: full logits + sft_loss
    head_chunk_rows: int = 512

    def __post_init__(self):
        if self.epochs < 0 or (self.schedule_epochs is not None and self.schedule_epochs < max(self.epochs, 1)):
            raise ValueError(f"sft: need epochs >= 0 and schedule_epochs >= epochs; got epochs={self.epochs}, "
                             f"schedule_epochs={self.schedule_epochs}")
        # (each failed at the warm-up's first step or batch, after the pre-SFT evaluation; helper review)
        if self.batch_size < 1 or self.group_by_length < 0 or self.head_chunk_rows < 0:
            raise ValueError(f"sft: need batch_size >= 1, group_by_length >= 0 and head_chunk_rows >= 0; got "
                             f"{self.batch_size}, {self.group_by_length}, {self.head_chunk_rows}")
        if self.accum_steps < 1 or self.batch_size % self.accum_steps:
            raise ValueError(f"sft.accum_steps={self.accum_steps} must be >= 1 and divide sft.batch_size="
                             f"{self.batch_size}")
        if self.optim.value_head_lr_scale != 1.0:
            raise ValueError("sft.optim.value_head_lr_scale: the warm-up trains no value head (set it under "
                             "rl.optim)")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """RL rounds. ReFT: 32 prompts per rollout, 1 sample each, constant lr, 2 PPO epochs.

    guards: reward-hacking guards (`reftjax.graders.guards`) applied to the RL rewards only (never to
      evaluation); off by default as in the paper: `--set rl.guards.enabled=true`. Flag counts are
      logged per iteration as `guard_<name>`; flagged samples carry `guards` in samples/rl_rollouts.jsonl.
    """

    iterations: int = 100
    # the RL phase's length in epochs of the training prompts, counted once the data is tokenized: when set, the run
    # takes epochs x (the prompts the length limits keep // prompts_per_iteration) iterations (the RL loader drops
    # each epoch's incomplete batch) and `iterations` is not read; config.json keeps both as given. An OpenAI job's
    # n_epochs sets it (counted on the file's examples, an epoch overran into the next one's prompts when the length
    # limits dropped some). null: `iterations`
    epochs: int | None = None
    prompts_per_iteration: int = 32
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=400, temperature=1.0)
    ppo: PPOConfig = PPOConfig()
    optim: OptimConfig = OptimConfig(learning_rate=3e-6, schedule="constant", warmup_ratio=0.0)
    eval_every: int = 10
    # evaluations without improvement before stopping (0: never); the measure is train.selection_metric's
    # (validation accuracy with the ReFT grader, the mean validation score with any other), as is the best checkpoint
    early_stop_patience: int = 0
    # the warm-up policy (validated before RL, `val_sft`) competes for the best checkpoint: an RL checkpoint is the
    # best only when its validation beats the warm-up's, early stopping counts from the warm-up, and when no RL
    # validation beats it `hf/best` is the warm-up and the after-ReFT test is the warm-up's (test_sft's figures, not
    # run again). false: the best RL checkpoint whatever the warm-up scored. No effect when rl.eval_every or
    # checkpoint.keep_best is 0 (no best is kept: hf/best is the final policy).
    best_includes_warmup: bool = True
    value_head_seed: int = 1
    # the experience and update run on the completion axis cut to the smallest of this many length buckets
    # (up to sampling.max_new_tokens) that holds every row; each (prompt bucket, completion bucket) pair the run
    # meets compiles once (data.tokenize.prompt_buckets x this many programs at most). 1: always the full length
    completion_buckets: int = 4
    guards: GuardConfig = GuardConfig(enabled=False)
    # rows of each iteration's rollout written to samples/rl_rollouts.jsonl, with the item id, the sample's index
    # among its prompt's samples and the grade (-1: every row; 0: none)
    samples_per_iteration: int = -1

    def __post_init__(self):
        s = self.sampling
        for name, low in (("iterations", 0), ("prompts_per_iteration", 1), ("eval_every", 0),
                          ("early_stop_patience", 0), ("samples_per_iteration", -1)):
            if getattr(self, name) < low:
                raise ValueError(f"rl.{name} must be >= {low}, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"rl.epochs must be >= 0 or null, got {self.epochs}")
        if self.ppo.algo != "ppo" and s.n not in (1, self.ppo.group_size):
            raise ValueError(f"rl.sampling.n={s.n}: {self.ppo.algo} draws rl.ppo.group_size={self.ppo.group_size} "
                             "samples per prompt; set group_size (sampling.n is for PPO)")
        if self.early_stop_patience and not self.eval_every:
            raise ValueError("rl.early_stop_patience needs validation: set rl.eval_every > 0")
        if self.completion_buckets < 1:
            raise ValueError(f"rl.completion_buckets must be >= 1, got {self.completion_buckets}")
        if s.greedy:
            raise ValueError("rl.sampling.greedy: RL needs sampled rollouts (set a temperature instead)")
        if s.temperature != self.ppo.temperature:
            raise ValueError(f"rl.sampling.temperature={s.temperature} but rl.ppo.temperature={self.ppo.temperature}: "
                             "the update's log-probs must be those of the distribution the rollout sampled from; "
                             "set them equal")
        if self.ppo.experience_from_rollout and (s.top_k or s.top_p < 1.0):
            raise ValueError("rl.ppo.experience_from_rollout needs the rollout to sample from the policy itself "
                             f"(top_k 0, top_p 1); got {s}")
        if self.ppo.critic_only:  # (crashed at the first PPO step, after the warm-up; helper review)
            raise ValueError("rl.ppo.critic_only is for a second, critic warm-up step built with make_optimizer(..., "
                             "separate_critic_state=True); the training loop runs no critic warm-up")
        if s.pad_id != SamplingConfig().pad_id:
            raise ValueError("rl.sampling.pad_id: the run pads with the tokenizer's pad token; leave it unset")
        if self.value_head_seed < 0:
            raise ValueError(f"rl.value_head_seed must be >= 0, got {self.value_head_seed}")
        check_key_seed("rl.value_head_seed", self.value_head_seed)
        if self.ppo.share_prompt and self.ppo.algo == "ppo" and s.n != self.ppo.group_size:
            raise ValueError(f"rl.ppo.share_prompt packs rl.ppo.group_size={self.ppo.group_size} samples per prompt "
                             f"but rl.sampling.n={s.n}: set them equal")
        if self.ppo.algo == "ppo" and self.ppo.group_size > 1 and s.n != self.ppo.group_size:
            # (it was ignored: one sample per prompt drawn, nothing said; a verl user's rollout.n; review)
            raise ValueError(f"rl.ppo.group_size={self.ppo.group_size} does not set PPO's samples per prompt: PPO "
                             f"draws rl.sampling.n={s.n} (verl's rollout.n); set rl.sampling.n={self.ppo.group_size} "
                             f"(and group_size with it, for share_prompt) or leave group_size at 1")
        n = self.ppo.group_size if self.ppo.algo != "ppo" else s.n  # samples per prompt, as run_rl draws them
        # (after the checks of samples per prompt: a PPO group_size without sampling.n was named as a minibatch
        # that does not divide the rows; helper-174, session 56)
        rows = self.prompts_per_iteration * n
        if self.ppo.minibatch_size is not None and rows % self.ppo.minibatch_size:
            # found here, not after the warm-up (the first ppo_step), when the corrected rerun is refused
            raise ValueError(f"rl.ppo.minibatch_size={self.ppo.minibatch_size} must divide the rollout batch of "
                             f"rl.prompts_per_iteration x samples per prompt = {rows} rows")

    @property
    def runs(self) -> bool:
        """Whether the RL phase runs at all, before the data is in (`rl.epochs` > 0, else `rl.iterations` > 0)."""
        return (self.iterations if self.epochs is None else self.epochs) > 0

    def with_epochs_counted(self, n_prompts: int) -> "RLConfig":
        """These settings with `iterations` = `epochs` x (`n_prompts` // `prompts_per_iteration`), the RL loader's
        full batches over `n_prompts` training prompts; unchanged when `epochs` is null."""
        if self.epochs is None:
            return self
        return dataclasses.replace(self, iterations=self.epochs * (n_prompts // self.prompts_per_iteration))


@dataclasses.dataclass(frozen=True)
class SandboxSettings:
    """The sandbox that runs `python` and `math_equiv` graders and P-CoT programs (`reftjax.graders.sandbox`).

    Attributes: timeout_s (wall clock per program; the ReFT authors' 2 s; OpenAI allows a python grader 2 min),
    memory_mb (address space per program; OpenAI: 2 GB), preimport (modules imported before the jobs fork, beyond
    `DEFAULT_PREIMPORT`'s standard-library modules, numpy and rapidfuzz: a job running as uid 65534 can import only
    what its server loaded, e.g. ["yaml", "sympy.stats"]; modules that load sockets, such as scipy's submodules or
    pandas, are refused: `train.run` starts the sandbox first and says so)."""

    timeout_s: float = 2.0
    memory_mb: int = 1024
    preimport: tuple[str, ...] = ()

    def __post_init__(self):
        import importlib.util

        if self.memory_mb < 256:  # (SandboxConfig's own check named memory_bytes, in bytes; review, session 30)
            raise ValueError(f"sandbox.memory_mb must be >= 256 (the interpreter's own), got {self.memory_mb}")
        self.sandbox_config()  # its range checks
        for name in self.preimport:
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise ValueError(f"sandbox.preimport: no module named {name!r} here")

    def sandbox_config(self):
        from reftjax.graders.sandbox import DEFAULT_PREIMPORT, SandboxConfig

        extra = tuple(m for m in self.preimport if m not in DEFAULT_PREIMPORT)
        return SandboxConfig(timeout_s=self.timeout_s, memory_bytes=int(self.memory_mb) << 20,
                             preimport=DEFAULT_PREIMPORT + extra)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """Attributes: save_every (steps), keep_last (per phase; a finished SFT or verifier phase then keeps only its
    last step, the one the next phases read), keep_best (by `train.selection_metric`: validation accuracy with
    the ReFT grader, the mean validation score with other graders)."""

    save_every: int = 50
    keep_last: int = 2
    keep_best: int = 1

    def __post_init__(self):
        if self.save_every < 1 or self.keep_last < 1 or self.keep_best < 0:
            raise ValueError(f"checkpoint: need save_every >= 1, keep_last >= 1, keep_best >= 0; got {self}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole ReFT run: model -> SFT warm-up [-> verifier] -> RL with validation -> test evaluation
    (greedy, voting@k [, rerank@k])."""

    name: str = "gsm8k_reft"
    model: str = "default"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    seed: int = 0
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()
    rerank: RerankConfig = RerankConfig()  # epochs 0: off
    checkpoint: CheckpointSettings = CheckpointSettings()
    grader: tuple = (("type", "reft"), ("cot", "nl"))
    sandbox: SandboxSettings = SandboxSettings()
    eval_before_sft: bool = True
    export_hf: bool = True
    # dtype of the exported weights (hf/final, hf/best): None = param_dtype; "bfloat16" halves a float32-master run's
    # export (the bf16 presets compute in bf16, so the rounded weights are what they evaluated)
    export_dtype: str | None = None
    # persistent XLA compilation cache (reftjax.xla_cache): None = $JAX_COMPILATION_CACHE_DIR, else
    # $REFTJAX_CACHE/xla (~/.cache/reftjax/xla); "" = off; else a directory. A resumed run loads its programs.
    compilation_cache: str | None = None

    def __post_init__(self):
        # the run's folder under runs/ (the CLI's default --out, the notebook's folder name): `--set name=` named the
        # run "" and made runs/ itself its folder (mutation review, session 45); ".." or an absolute path left runs/
        parts = self.name.replace("\\", "/").split("/")
        if not self.name.strip() or self.name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"name={self.name!r}: a run's name is its folder under runs/ (the default --out): give a "
                             f"non-empty name without '.', '..' or empty path parts")
        if self.rerank.epochs and not self.eval.voting_k:
            raise ValueError("rerank.epochs > 0 scores the test set's voting samples: set eval.voting_k > 0")
        if self.rerank.epochs and self.rerank.max_new_tokens < self.eval.max_new_tokens:
            # the training solutions were cut (no EOS, mostly no answer: labelled wrong) where the scored test
            # samples go on and end (review, session 28: gpu/tpu/paper trained at 256 and scored up to 400)
            raise ValueError(f"rerank.max_new_tokens={self.rerank.max_new_tokens} is shorter than "
                             f"eval.max_new_tokens={self.eval.max_new_tokens}: the verifier would score longer "
                             f"solutions than any it trained on (the ReFT authors use one length); set them equal")
        if self.export_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"export_dtype must be null, 'float32', 'bfloat16' or 'float16', "
                             f"got {self.export_dtype!r}")
        for name in ("dtype", "param_dtype"):  # (refused only once the checkpoint was found: after a hub download,
            # as a traceback; review, session 30). float16: ModelConfig's reason, nothing scales the loss
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        if self.seed < 0:  # (NumPy's generators refuse it: the loaders failed after the pre-SFT evaluation)
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        check_key_seed("seed", self.seed)
        try:  # the spec's structure, cheaply (no program runs, no item is read): a bad one was taken by
            # --print-config, exit 0, and refused only by run() (review)
            grader = self.grader_dict
        except (TypeError, ValueError) as exc:
            raise ValueError(f"grader: expected an object such as {{\"type\": \"reft\"}}: {exc}") from None
        build_grader(grader)  # (ConfigError, a ValueError, naming grader.<field>)
        style = self.data.prompt.style
        for cot in _reft_cots(self.grader):  # the top-level ReFT grader, or those inside a multi grader
            if (cot == "python") != style.endswith("python"):
                # P-CoT prompts force a program and its targets have no answer line: an N-CoT grader scores even
                # the gold targets 0, and an N-CoT prompt's answers run as programs: the reward is never earned
                raise ValueError(f"data.prompt.style={style!r} does not match the ReFT grader's cot={cot!r}: the "
                                 f"python styles ('reft-python', 'chat-python') go with cot 'python', the others with "
                                 f"'nl' (change both at once: --set both, or config.replace_paths)")

    @property
    def grader_dict(self) -> dict:
        return json.loads(json.dumps(dict(self.grader)))


def _reft_cots(grader) -> list[str]:
    """The `cot` of every ReFT grader in a grader config: itself, or the sub-graders of a `multi` grader (nested).
    A malformed config yields none here (`build_grader` names what is wrong with it)."""
    try:
        g = dict(grader)
    except (TypeError, ValueError):
        return []
    if g.get("type") == "reft":
        return [str(g.get("cot", "nl"))]
    subs = g.get("graders") if g.get("type") == "multi" else None
    return [c for sub in subs.values() for c in _reft_cots(sub)] if isinstance(subs, dict) else []


def selection_metric(cfg: ExperimentConfig) -> str:
    """What picks the best RL checkpoint and drives early stopping: validation `accuracy` (greedy top-1, score 1)
    with the ReFT grader, as the paper selects; the mean validation score with any other grader. Graders with
    partial credit (text_similarity, python, score_model, multi) rarely score 1, so their accuracy sat at 0: every
    evaluation tied, the latest checkpoint counted as best and early stopping fired while the reward rose."""
    return "accuracy" if cfg.grader_dict.get("type") == "reft" else "mean_score"


def to_dict(cfg) -> dict:
    """`cfg` as plain JSON data: dicts and lists are copies, so editing the result leaves the (frozen) config as it
    was (the grader's dict was the config's own; found writing a test, session 35)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(x) for x in cfg]
    return cfg


def to_json(cfg: ExperimentConfig) -> dict:
    """`to_dict(cfg)` with the grader and the chat template's variables as the JSON objects `--set` takes (they are
    held as (name, value) pairs, which read as `[["type", "reft"], ["cot", "nl"]]`): what `--print-config` prints
    and a run's config.json and summary.json hold. `from_dict` reads either form back as the same config."""
    d = to_dict(cfg)
    d["grader"] = cfg.grader_dict
    d["data"]["prompt"]["chat_template_kwargs"] = cfg.data.prompt.template_kwargs
    return d


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if tp is tuple or typing.get_origin(tp) is tuple:
        return "a list"
    return getattr(tp, "__name__", None) or repr(tp)


class DuplicateName(ValueError):
    """A JSON object of a setting names one field twice."""


def unique_names(pairs):
    """`json.loads`' object_pairs_hook for settings: a name given twice is refused (json keeps the last one
    silently: `{"a": 1, "a": 2}` set `a` to 2 without a word; helper review, session 39)."""
    out = {}
    for name, value in pairs:
        if name in out:
            raise DuplicateName(f"the name {name!r} is given twice in one JSON object")
        out[name] = value
    return out


def _build(tp, value, where: str = "config"):
    """`value` (parsed JSON) as an instance of the type hint `tp`; ValueError naming the field's path otherwise.

    Scalars are checked, not coerced: a string where a bool, number or None belongs (``--set export_hf=False``
    read as the string "False", which is truthy) used to pass through and silently mean something else."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object of {tp.__name__} fields, got {value!r}")
        hints = typing.get_type_hints(tp)
        unknown = set(value) - {f.name for f in dataclasses.fields(tp)}
        if unknown:
            raise ValueError(f"{where} ({tp.__name__}): unknown field(s) {sorted(unknown)}")
        fields = {k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        try:
            return tp(**fields)
        except (TypeError, ValueError) as exc:
            below = where.partition(".")[2]  # the path under the root ("" for the whole config)
            if isinstance(exc, ValueError) and (not below or re.match(rf"{re.escape(below)}(?!\w)", str(exc))):
                raise  # a __post_init__ check naming its setting from the root: "--set: config: grader: ..." said less
            raise ValueError(f"{where}: {exc}") from exc
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _build(arg, value, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else Any
        return tuple(_build(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is tuple:  # untyped pairs (the grader): lists become tuples, a JSON object stays as given
        if isinstance(value, list) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
            return tuple(tuple(v) for v in value)
        if isinstance(value, (dict, tuple)):
            return value
        # (a string or number was accepted and crashed run() with a traceback)
        example = '{"type": "reft"}' if where.endswith("grader") else '{"enable_thinking": false}'
        raise ValueError(f"{where}: expected an object such as {example}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e3
            return int(value)
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN passes every `x <= 0` check: a run would train on NaN
                raise ValueError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(d: dict) -> ExperimentConfig:
    return _build(ExperimentConfig, d)


def replace_path(cfg, path: str, value):
    """Functional update of a nested field: replace_path(cfg, "rl.ppo.kl_coef", 0.01)."""
    return replace_paths(cfg, {path: value})


def replace_paths(cfg, updates: dict):
    """Functional update of several nested fields at once, each sub-config rebuilt (and checked) once with all of
    its changes: replace_paths(cfg, {"data.prompt.style": "reft-python", "grader": (("type", "reft"), ("cot",
    "python"))}). Fields checked against each other (the prompt style and the grader; a train file and its format)
    must change together: one at a time, the first change is refused."""
    direct, nested = {}, {}
    for path, value in updates.items():
        head, _, rest = path.partition(".")
        if not any(f.name == head for f in dataclasses.fields(cfg)):
            raise ValueError(f"{type(cfg).__name__} has no field {head!r}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    if set(direct) & set(nested):
        raise ValueError(f"{sorted(set(direct) & set(nested))}: set as a whole and by field in one update")
    return dataclasses.replace(cfg, **direct, **{h: replace_paths(getattr(cfg, h), u) for h, u in nested.items()})
