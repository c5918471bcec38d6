"""The ReFT pipeline as one function: load -> SFT warm-up [-> verifier] -> RL rounds with validation -> test.

`run(cfg, out_dir)` is a host loop over the jitted steps (no trainer
object). Each phase is resumable: SFT and RL checkpoints (Orbax, async) hold
the train state, the data-loader position and loop counters; the SFT policy
that becomes the frozen reference is the final SFT checkpoint (`sft_done.json` names it). Rerunning the
same command continues from the latest valid checkpoint; Ctrl-C saves and exits.
With `cfg.rerank.epochs > 0` a verifier phase (`run_rerank`) runs right after the warm-up, which is all
it needs: the test evaluations after warm-up and after ReFT then score their own voting samples with it
(rerank@k in the same pass as greedy and voting@k), and its weights are dropped during RL and restored
from its checkpoint for the final test. Its sampled training data (`verifier_data.npz`) and its
checkpoints resume like the other phases.

Run directory layout:

    config.json  data.json  metrics.jsonl  tensorboard/  samples/*.jsonl
    checkpoints/{sft,rl,verifier}/  sft_done.json  verifier_data.npz  verifier_done.json  evals.json
    hf/{final,best}/  summary.json  summary.md  plots/*.png
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import pathlib
import signal
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np

from reftjax import checkpoint as ckpt
from reftjax import xla_cache
from reftjax.config import ExperimentConfig, from_dict, selection_metric, to_dict, to_json
from reftjax.data import (Loader, LoaderConfig, SplitConfig, load_examples, tokenize_examples, train_val_split)
from reftjax.data.records import DataError
from reftjax.data.tokenize import end_of_turn_id
from reftjax.evaluate import evaluate
from reftjax.graders import build_grader, check_imports, check_judges, check_wordnet, reach_warnings
from reftjax.graders.reft import ReftGrader, default_pool
from reftjax.graders.base import GraderFailure, every_one_faulted, failure_message, sub_score_means
from reftjax.graders.build import GSM8K_FIELDS
from reftjax.graders.judge import DEFAULT_EMBEDDING_MODEL, ENDPOINT_KEYS
from reftjax.graders.callback import make_reward_fn
from reftjax.hf import load_model, save_hf
from reftjax.metrics import MetricsLogger, measured_peak_flops, mfu, read_metrics, rl_iteration_flops
from reftjax.rerank import (VerifierData, abstract_verifier, init_verifier, make_verifier_step,
                            sample_verifier_data)
from reftjax.rollout import completion_buckets, rollout, trim_to_bucket
from reftjax.sharding import (BATCH_AXES, batch_devices, from_process_0, is_primary, make_mesh,
                              maybe_initialize_distributed, shard_batch, to_host)
from reftjax.sharding import any_process as _any_process, any_process_later as _any_process_later
from reftjax.steps import (init_rl_params, init_state, make_experience_fn, make_optimizer, make_ppo_step, make_sft_step,
                           ppo_updates_per_step, schedule_value)

log = logging.getLogger("reftjax")


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    train_ds: object          # tokenized train split (with SFT targets when sft.epochs > 0)
    val_ds: object
    test_ds: object
    train_items: list
    val_items: list
    test_items: list
    where: dict = dataclasses.field(default_factory=dict)  # split -> each item's `path:line` ('' if built in)


@dataclasses.dataclass
class Splits:
    """The three splits' examples as read (records checked, nothing tokenized: no model needed), and what
    `check_grader_fields` reads of them; `prepare_data` tokenizes them into `Data` (each computed once: both read
    the items)."""
    train: list
    val: list
    test: list

    @functools.cached_property
    def train_items(self) -> list:
        return [_item(e) for e in self.train]

    @functools.cached_property
    def val_items(self) -> list:
        return [_item(e) for e in self.val]

    @functools.cached_property
    def test_items(self) -> list:
        return [_item(e) for e in self.test]

    @functools.cached_property
    def where(self) -> dict:
        return {split: [e.where for e in exs] for split, exs in (("train", self.train), ("validation", self.val),
                                                                  ("test", self.test))}


def _item(ex) -> dict:
    item = {"item_id": ex.item_id, "question": ex.question, "answer_value": ex.answer, **ex.fields}
    if ex.answer:  # the answer read from `data.answer_field` wins over a file field that is also named answer_value
        item["answer_value"] = ex.answer
    return item


def _text_answers(grader_cfg) -> bool:
    """Whether the grader config holds a ReFT grader of multiple-choice answers (answer_type "mathqa", possibly
    inside a multi grader): its gold answers are read as text (MathQA's files were refused as not numbers)."""
    if isinstance(grader_cfg, dict):
        return grader_cfg.get("answer_type") == "mathqa" or any(_text_answers(v) for v in grader_cfg.values())
    return False


def _read(cfg: ExperimentConfig, file: str) -> list:
    d = cfg.data
    return load_examples(file=file, fmt=d.train_format, answer_field=d.answer_field,
                         numeric=not _text_answers(cfg.grader_dict))


def train_val_examples(cfg: ExperimentConfig, progress: bool = True) -> tuple[list, list]:
    """The training and validation examples of `read_splits` (before the tokenizer's length limits): an OpenAI job's
    `n_epochs` counts the training ones (`reftjax.openai_job`)."""
    d = cfg.data
    examples = _read(cfg, d.train_file) if d.train_file else load_examples(
        d.dataset, split="train", numeric=not _text_answers(cfg.grader_dict), progress=progress)
    if d.val_file:  # a validation file (OpenAI RFT's): the training file is used whole
        train, val = examples, _read(cfg, d.val_file)
    else:
        train, val = train_val_split(examples, SplitConfig(val_fraction=d.val_fraction, seed=d.seed))
    return (train[: d.n_train] if d.n_train is not None else train,
            val[: d.n_val] if d.n_val is not None else val)


def read_splits(cfg: ExperimentConfig, progress: bool = True) -> Splits:
    """The train, validation and test examples `cfg.data` names, read and checked (a bad line is a DataError at its
    file and line) without a tokenizer: `_run` reads them before the model loads (minutes at 7B; review). `progress`:
    tfds's bars when GSM8K is built."""
    from reftjax.report import same_file

    d = cfg.data
    train, val = train_val_examples(cfg, progress)
    test = _read(cfg, d.test_file) if d.test_file else load_examples(
        d.test_dataset, split=d.test_split, numeric=not _text_answers(cfg.grader_dict), progress=progress)
    if d.train_file and d.train_format != "gsm8k-jsonl" and not d.test_file:  # said only in summary.md (review)
        log.warning("data.train_file without data.test_file: the test evaluations run on %s/%s with this grader; "
                    "name the task's own test file with data.test_file", d.test_dataset, d.test_split)
    elif same_file(d.test_file, d.val_file):
        log.warning("data.test_file is data.val_file (%s): the test figures are of the validation split that picks "
                    "the best checkpoint, not held out; name a held-out file with data.test_file", d.test_file)
    if same_file(d.val_file, d.train_file):
        log.warning("data.val_file is data.train_file (%s): validation, which picks the best checkpoint, scores "
                    "training examples; name a held-out file with data.val_file", d.val_file)
    return Splits(train, val, test[: d.n_test] if d.n_test is not None else test)


def prepare_data(cfg: ExperimentConfig, tokenizer, splits: Splits | None = None) -> Data:
    """`splits` (else `read_splits(cfg)`) tokenized, with the grader's items; every split must keep an example."""
    d = cfg.data
    sp = read_splits(cfg) if splits is None else splits
    train, val, test = sp.train, sp.val, sp.test
    def tok(exs, targets):
        return tokenize_examples(exs, tokenizer, d.prompt, d.tokenize, with_targets=targets)

    data = Data(tok(train, cfg.sft.epochs > 0), tok(val, False), tok(test, False),  # SFT targets only if SFT runs
                sp.train_items, sp.val_items, sp.test_items, sp.where)
    for split, ds in (("train", data.train_ds), ("validation", data.val_ds), ("test", data.test_ds)):
        if len(ds) == 0:  # found before the warm-up, not by the first evaluation after it
            raise DataError(f"{d.train_file or d.dataset}:0: the {split} split is empty ({len(train)} train, "
                            f"{len(val)} validation, {len(test)} test examples before the length limits; "
                            f"data.val_fraction={d.val_fraction}, data.tokenize.max_prompt_len="
                            f"{d.tokenize.max_prompt_len}): model selection and the report need every split")
    for split, st in split_stats(data).items():
        if st["dropped"] or st["prompt_truncated"] or st["target_truncated"]:
            log.warning("%s split: %d of %d examples dropped, %d prompts and %d targets truncated by the length limits "
                        "(data.tokenize: max_prompt_len=%d, max_target_len=%d, truncation=%r)%s", split, st["dropped"],
                        st["examples"], st["prompt_truncated"], st["target_truncated"], d.tokenize.max_prompt_len,
                        d.tokenize.max_target_len, d.tokenize.truncation,
                        "; its accuracy is over the kept examples only" if split != "train" else "")
    return data


def split_stats(data: Data) -> dict:
    """Per-split tokenization counts (examples, kept, dropped, truncated) for the run summary."""
    return {split: dict(ds.stats) for split, ds in (("train", data.train_ds), ("val", data.val_ds),
                                                     ("test", data.test_ds))}


def data_fingerprints(data: Data) -> dict:
    """Per split: its example count, the digest of its token ids (`TokenizedDataset.fingerprint`) and that of
    its reference items (the gold answers a grader reads, which RL-only data does not tokenize)."""
    digest = lambda items: hashlib.blake2b(json.dumps(items, sort_keys=True, default=str).encode(),  # noqa: E731
                                           digest_size=8).hexdigest()
    return {split: {"examples": len(ds), "tokens": ds.fingerprint, "items": digest(items)}
            for split, ds, items in (("train", data.train_ds, data.train_items), ("val", data.val_ds, data.val_items),
                                     ("test", data.test_ds, data.test_items))}


@jax.jit
def _bit_sums(params):
    """Per leaf, two uint32 sums of its raw bits (plain, and weighted by position mod 65521): integer sums wrap
    and are exact, so they do not depend on the mesh, the sharding or the reduction order."""
    def one(x):
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        bits = bits.astype(jnp.uint32)
        pos = jnp.zeros(x.shape, jnp.uint32)  # a function of the flat index (no [N] iota: the leaf's own sharding)
        for d in range(x.ndim):
            stride = int(np.prod(x.shape[d + 1:], dtype=np.int64)) % 65521
            pos = pos + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
        # one variadic reduction: XLA fuses the elementwise work into it (two jnp.sum calls shared `bits` and
        # materialised it as uint32 twice: 4x a bf16 leaf's memory on XLA:CPU)
        sums = jax.lax.reduce((bits, bits * (pos % 65521 + 1)), (jnp.uint32(0), jnp.uint32(0)),
                              lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(x.ndim)))
        return jnp.stack(sums)
    return jax.tree.map(one, params)


def model_fingerprint(params) -> str:
    """A digest of the loaded weights (their bits; `_bit_sums`), recorded in data.json: a rerun resumes the run's
    policy against a reference, and a cached evaluation, of the model it was started on; a different model behind
    the same `--model` (a folder replaced, a relative path from another directory, a moved hub revision) is refused."""
    leaves = jax.tree_util.tree_leaves_with_path(to_host(_bit_sums(params)))
    h = hashlib.blake2b(digest_size=8)
    for path, sums in leaves:
        h.update(jax.tree_util.keystr(path).encode() + np.asarray(sums, np.uint32).tobytes())
    return h.hexdigest()


# ModelConfig fields added after runs recorded its digest, with their defaults (qk_norm: Qwen3, session 38; the
# rest: Gemma, OLMo 2 and per-layer windows, session 39; rope_layers: SmolLM3, session 40; rotary_dim: Phi-4, 41)
_ADDED_FIELDS = {"qk_norm": False, "sliding_layers": (), "local_rope_theta": None, "rope_layers": (),
                 "hidden_act": "silu", "norm_offset": 0.0, "embed_scale": False, "query_pre_attn_scalar": None,
                 "sandwich_norms": False, "attn_logit_softcap": None, "final_logit_softcap": None,
                 "qk_norm_per_head": True, "pre_norms": True, "norm_scale_float32": False, "rotary_dim": 0}
# RopeScaling's, likewise (YaRN, session 40; LongRoPE, session 41)
_ADDED_ROPE_FIELDS = {"attention_factor": 1.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
                      "short_factor": (), "long_factor": (), "factors": "auto"}


def model_config_fingerprint(model_cfg) -> str:
    """A digest of what the model computes besides its weights (`ModelConfig` from config.json and
    generation_config.json's EOS ids: norms, RoPE, stopping), without the run's layout settings (dtypes and remat
    are settings of config.json, and remat may change on resume). A field added to `ModelConfig` later counts only
    away from its default (`_ADDED_FIELDS`): every run begun before it existed would otherwise refuse to resume."""
    fields = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in ("dtype", "param_dtype", "remat")
              and not (k in _ADDED_FIELDS and v == _ADDED_FIELDS[k])}
    fields["rope_scaling"] = {k: v for k, v in fields["rope_scaling"].items()
                              if not (k in _ADDED_ROPE_FIELDS and v == _ADDED_ROPE_FIELDS[k])}
    return hashlib.blake2b(json.dumps(fields, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def pin_longrope(cfg: ExperimentConfig, model_cfg):
    """`model_cfg` with LongRoPE's factors pinned for the whole run (Phi-3.5-mini, Phi-4-mini): the long set when the
    longest sequence the settings allow (`data.tokenize.max_prompt_len` + the longest of `max_target_len`, the RL,
    evaluation and rerank `max_new_tokens`, each where its phase runs) passes the original context, else the short set.
    transformers picks per forward by the batch's longest position: a rollout that passed the original context midway
    sampled from other log-probs than the update recomputed (the first PPO update's ratio 1.41 at 2-row minibatches),
    and a row's logits changed with the rows batched beside it (helper review, session 41). Other models: unchanged."""
    sc = model_cfg.rope_scaling
    if sc.kind != "longrope" or sc.factors != "auto":
        return model_cfg
    t = cfg.data.tokenize
    # the phases that run: SFT targets, RL and rerank completions (off, rerank's settings may change on resume),
    # evaluation's always (the base model's test at least)
    lengths = (t.max_target_len if cfg.sft.epochs else 0, cfg.rl.sampling.max_new_tokens if cfg.rl.runs else 0,
               cfg.rerank.max_new_tokens if cfg.rerank.epochs else 0, cfg.eval.max_new_tokens)
    longest = t.max_prompt_len + max(lengths)
    factors = "long" if longest > sc.original_max_position_embeddings else "short"
    log.info("LongRoPE: the %s factors for every forward of this run (sequences up to %d tokens, original context %d)",
             factors, longest, sc.original_max_position_embeddings)
    return model_cfg.replace(rope_scaling=dataclasses.replace(sc, factors=factors))


def _check_same_data(path: pathlib.Path, new: dict) -> None:
    """A rerun resumes checkpoints, loader positions and finished evaluations taken on the data in `path`
    (`data.json`): refused when the data differs (a file edited in place keeps the settings and maybe the count)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path}: unreadable ({type(e).__name__}: {e}); this run directory cannot be resumed: "
                          f"use a new output directory") from e
    # (runs started before a digest was recorded: that part not checked)
    differs = [k for k in old.get("model", {}) if old["model"][k] != new.get("model", {}).get(k)]
    if differs:
        if differs == ["longrope"]:  # (the length settings cannot change on resume: the rule did)
            raise RunDirError(f"{path}: this run pinned LongRoPE's {old['model']['longrope']} factors, this reftjax "
                              f"version picks the {new['model'].get('longrope')} ones for its settings "
                              f"(train.pin_longrope): resume with the version that began it or use a new output "
                              f"directory")
        what = {"params": "weights", "config": "configuration (config.json, generation_config.json's EOS ids)",
                "longrope": "LongRoPE factor set"}
        digests = ", ".join(f"{old['model'][k]} -> {new.get('model', {}).get(k)}" for k in differs)
        raise RunDirError(f"{path}: the model's {' and '.join(what.get(k, k) for k in differs)} differ from those this "
                          f"run was started on (digest {digests}): a model folder replaced, or a relative --model read "
                          f"from another directory? Rerunning resumes the run, so load the original model or use a new "
                          f"output directory")
    changed = [f"{split} ({', '.join(k for k in new[split] if old.get(split, {}).get(k) != new[split][k])})"
               for split in new if split != "model" and old.get(split) != new[split]]
    if changed:
        raise RunDirError(f"{path}: the data differs from the data this run was started on: {'; '.join(changed)} "
                          f"(a data file edited or replaced? or a reftjax version that tokenizes differently: its "
                          f"tokens change, its items do not); rerunning resumes the run, so use the original data and "
                          f"version or a new output directory")


# ----------------------------------------------------------------------------- helpers


class _Interrupt:
    """Turns SIGINT/SIGTERM into a flag checked between steps (so a save can finish).

    `requested` is this process's flag. The loops decide with `poll()` (at each step's save decision) or `check()`
    (between phases) and read the decision from `agreed`: with several processes the flag is gathered from all of
    them, so all stop at the same step and take part in the same collective save. Each process deciding alone (a
    signal reaching the hosts a moment apart, or one host) left one process in the save and the other in the next
    step: both hung.
    """

    def __init__(self):
        self.requested = False
        self.agreed = False
        self._pending = None  # (several processes) the gather `poll` dispatched at the previous step, unread

    def check(self) -> bool:
        """Whether any process was interrupted (a collective: every process calls it at the same point). With
        several processes it waits for the device work queued before it."""
        self._pending = None
        self.agreed = _any_process(self.requested)
        return self.agreed

    def poll(self) -> bool:
        """`check` for the every step of a loop whose host runs ahead of its devices (SFT, the verifier). With
        several processes the gather is dispatched here and read at the next step's poll, once the step before has
        run: read at once it waited for the step just queued (`bench/interrupt_poll.py`), so no host ran a step
        ahead and the devices idled while each next batch was made and dispatched (session 29's list). An interrupt
        then stops the loop a step later. One process: `check`, which touches no device. (The RL loop waits for
        each iteration's device work anyway: it checks at once.)"""
        if jax.process_count() == 1:
            return self.check()
        previous, self._pending = self._pending, _any_process_later(self.requested)
        self.agreed = previous is not None and bool(np.asarray(previous.addressable_data(0)))
        return self.agreed

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.requested:  # second Ctrl-C: give up immediately
                raise KeyboardInterrupt
            self.requested = True
            log.warning("interrupt received: saving a checkpoint and exiting")

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _bar(total, desc, initial=0, enable=True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=not enable or jax.process_index() != 0,
                dynamic_ncols=True)


def _write_json(path: pathlib.Path, obj) -> None:
    """Atomic write. Every process of a multi-process run writes its own identical copy (the run's
    small state files must be readable on every host, shared file system or not)."""
    tmp = path.with_suffix(path.suffix + f".tmp{jax.process_index()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)


def _load_evals(out: pathlib.Path) -> dict:
    p = out / "evals.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _record_eval(out: pathlib.Path, name: str, res: dict, logger: MetricsLogger, phase: str, step: int):
    """Writes an evaluation's samples, then its metrics line, then its entry in `evals.json`, which marks it done:
    a run killed in between redoes the evaluation (a rerun reuses what `evals.json` holds), and the redone
    metrics line replaces the killed attempt's."""
    figures = {k: v for k, v in res.items() if k != "samples"}
    if is_primary():
        (out / "samples").mkdir(exist_ok=True)
        tmp = out / "samples" / f"{name}.jsonl.tmp"
        with open(tmp, "w") as f:
            for s in res.get("samples", []):
                f.write(json.dumps(s) + "\n")
        tmp.replace(out / "samples" / f"{name}.jsonl")
    logger.rewind({phase: step - 1})  # a killed attempt's line for this evaluation
    logger.log(phase, step, figures)
    kept = {k: v for k, v in figures.items() if k != "seconds"}  # (a timing: the metrics line has it)
    _write_json(out / "evals.json", {**_load_evals(out), name: kept})


# ----------------------------------------------------------------------------- phases


def run_sft(cfg: ExperimentConfig, model, data: Data, mesh, out: pathlib.Path, logger, stop: _Interrupt,
            progress: bool):
    """SFT warm-up (resumes from checkpoints/sft); returns (policy params, final step or None if interrupted).

    `model.params` are consumed: donated to the first step of a fresh warm-up, deleted once a resumed one is
    restored (a resumed run held them beside the restored state until the warm-up ended: a model size more)."""
    s = cfg.sft
    loader = Loader(data.train_ds, LoaderConfig(batch_size=s.batch_size, kind="sft", seed=cfg.seed,
                                                group_by_length=s.group_by_length), mesh=mesh)
    total = max(s.epochs * loader.batches_per_epoch, 1)
    schedule_total = max((s.schedule_epochs or s.epochs) * loader.batches_per_epoch, 1)  # >= total
    tx = make_optimizer(s.optim, schedule_total)
    lr_at = functools.partial(schedule_value, s.optim, schedule_total)
    with ckpt.Checkpointer(ckpt.CheckpointConfig(str(out / "checkpoints" / "sft"),
                                                 save_every=cfg.checkpoint.save_every,
                                                 keep_last=cfg.checkpoint.keep_last, keep_best=0),
                           config=to_dict(cfg)) as manager:
        params, key = {"policy": model.params}, jax.random.key(cfg.seed)
        restored = manager.restore_latest(init_state(params, tx, key, abstract=True))
        if restored is None:
            state = init_state(params, tx, key)
        else:
            state, extras, _ = restored
            for x in jax.tree.leaves(params):  # (the restored state replaces them, as a fresh run's first step does)
                if isinstance(x, jax.Array):
                    x.delete()
            loader.restore(extras["loader"])
            log.info("SFT resumed at step %d", int(state.step))
        del params
        step_fn = make_sft_step(model.config, tx, s.accum_steps, s.head_chunk_rows)
        peak = measured_peak_flops(dtype=model.config.dtype)
        applied = int(jax.device_get(state.step))  # optimizer updates so far: the schedule's position
        done = applied + int(jax.device_get(state.skipped))
        logger.rewind({"sft": done - 1})  # steps 0 .. done-1 are in the checkpoint (logged before it); none if fresh
        bar = _bar(total, "SFT", done, progress)
        prev, last = None, None  # last: when the previous step's metrics were read (its completion)
        stop.check()  # an interrupt between phases (all processes decide together)
        shapes = set()  # batch shapes dispatched: a new one compiles in the call, before its step is queued
        while done < total and not stop.agreed:
            batch = next(loader)
            if prev is not None and batch["tokens"].shape not in shapes:
                # the previous step's metrics first: read after a compiling call, its time took in the compile (rates
                # 10x low on the step before each new bucket; review, session 29). One wait per new bucket.
                skipped, last = _log_sft(logger, *prev, peak, model.config, lr_at(applied), last)
                applied += 1 - skipped
                prev = None
            shapes.add(batch["tokens"].shape)
            t0, c0 = time.perf_counter(), xla_cache.busy_seconds()
            state, metrics = step_fn(state, batch)
            compile_s = xla_cache.busy_seconds() - c0  # the step's program compiled in the call, before it ran
            if prev is not None:  # read the previous step's metrics one step late
                skipped, last = _log_sft(logger, *prev, peak, model.config, lr_at(applied), last)
                applied += 1 - skipped
            prev = (done, metrics, t0, compile_s, batch["tokens"].shape)
            done += 1
            bar.update(1)
            interrupted = stop.poll()  # every step, before the save decision (an `or` after it skipped the check)
            if interrupted or done % cfg.checkpoint.save_every == 0 or done == total:
                jax.block_until_ready(metrics)  # its line goes out before the checkpoint that covers it
                skipped, last = _log_sft(logger, *prev, peak, model.config, lr_at(applied), last)
                applied += 1 - skipped
                prev = None
                manager.save(done, state, {"loader": loader.state(), "phase": "sft"}, force=True)
        if prev is not None:
            jax.block_until_ready(prev[1])
            _log_sft(logger, *prev, peak, model.config, lr_at(applied), last)
        bar.close()
        if done >= total:  # the finished warm-up's last step is all a rerun reads (sft_done.json names it)
            manager.keep_only(done)
    return state.params["policy"], (done if done >= total else None)


def _log_sft(logger, step, metrics, t0, compile_s, shape, peak, model_cfg, lr, last) -> tuple[int, float]:
    """Logs one SFT step (`lr`: the learning rate its update used); returns (1 if the update was skipped,
    the time its metrics arrived). `tokens_per_s` and `mfu` count the batch's real tokens (its attention
    mask), `padded_tokens_per_s` every position of the padded batch.

    The step ran from its dispatch `t0` (plus `compile_s`, the compilation its call did first, logged as
    `compile_seconds`: the first step's rates are the program's, not the compiler's) or, when dispatched while
    the previous step still ran (async dispatch), from that step's completion `last`; timing from `t0` alone
    counted about two steps per step.
    """
    m = jax.device_get(metrics)
    now = time.perf_counter()
    dt = max(now - max(t0 + compile_s, last or 0.0), 1e-9)
    m["compile_seconds"] = compile_s
    n_tok = float(m["input_tokens"])  # real tokens: counting the padded [B, T] overstated tokens/s and MFU
    m["tokens_per_s"] = n_tok / dt
    m["padded_tokens_per_s"] = shape[0] * shape[1] / dt  # positions the step computed
    m["mfu"] = mfu(n_tok, dt, 3 * model_cfg.flops_per_token(shape[1] // 2), peak)
    m["lr"] = lr
    logger.log("sft", step, m)
    return int(m["skipped"]), now


_COUNTER_NAMES = {"graded": "graded", "unanswered": "unanswered", "errors": "grader_errors"}  # the grader's counts


def run_rl(cfg: ExperimentConfig, model, ref_params, data: Data, grader, mesh, out: pathlib.Path, logger,
           stop: _Interrupt, progress: bool, compiles: xla_cache.CompileStats | None = None,
           warmup_val: float | None = None):
    """PPO/GRPO rounds from the warm-up policy; returns (final params, best params or None, iterations run,
    finished: all iterations or stopped early, not interrupted, the best's RL iteration: 0 for the warm-up, None
    when there is no best).

    `warmup_val`: the warm-up's validation figure (`selection_metric`) when `rl.best_includes_warmup`: RL
    checkpoints must beat it to be the best, and when none does the best is `ref_params` (the warm-up). (Before it,
    an RL phase that only made the policy worse exported its least bad RL checkpoint as `hf/best`.)

    `compiles` (the run's `xla_cache.CompileStats`) puts `xla_programs`, the programs compiled or loaded
    so far (checkpoint saves and validations included), in every metrics line, and `iteration_programs`, those of
    the iteration's rollout, experience and update: 0 after the first iterations unless something recompiles (the
    running count grew with the saves' and validations' own programs; recompile audit, session 35)."""
    r = cfg.rl
    samp = dataclasses.replace(r.sampling, n=r.ppo.group_size if r.ppo.algo != "ppo" else r.sampling.n,
                               eos_ids=_eos_ids(cfg, model),
                               pad_id=model.tokenizer.pad_token_id)
    loader = Loader(data.train_ds, LoaderConfig(batch_size=r.prompts_per_iteration, kind="prompt",
                                                seed=cfg.seed + 1), mesh=mesh)
    # The schedule advances on every minibatch update, ppo_epochs x minibatches of them per iteration.
    total = r.iterations * ppo_updates_per_step(r.ppo, r.prompts_per_iteration * samp.n)
    tx = make_optimizer(r.optim, total)
    fresh = functools.partial(init_rl_params, model_cfg=model.config, cfg=r.ppo, rng=jax.random.key(r.value_head_seed))
    key = jax.random.key(cfg.seed + 2)
    with ckpt.Checkpointer(ckpt.CheckpointConfig(str(out / "checkpoints" / "rl"),
                                                 save_every=cfg.checkpoint.save_every,
                                                 keep_last=cfg.checkpoint.keep_last,
                                                 keep_best=cfg.checkpoint.keep_best),
                           config=to_dict(cfg)) as manager:
        # (checkpoint.keep_best=0 keeps no best: hf/best is the final policy, the warm-up too is not a candidate)
        # the warm-up's figure when it competes: the bar an RL checkpoint must beat, else None
        floor = warmup_val if r.best_includes_warmup and r.eval_every and cfg.checkpoint.keep_best else None
        it, best, since_best, last_val = 0, -1.0 if floor is None else floor, 0, None
        best_it = None if floor is None else 0  # the best's iteration (0: the warm-up; runs begun before: not recorded)
        # a resume restores onto the fresh state's shapes alone (no policy or critic copy, no optimizer state)
        abstract = ckpt.abstract_like(fresh(ckpt.abstract_like(ref_params)))
        restored = manager.restore_latest(init_state(abstract, tx, key, abstract=True))
        del abstract
        if restored is None:
            state = init_state(fresh(jax.tree.map(jnp.copy, ref_params)), tx, key)  # (the policy is donated)
        else:
            state, extras, _ = restored
            loader.restore(extras["loader"])
            it, best, since_best = extras["iteration"], extras["best"], extras["since_best"]
            best_it = extras.get("best_iteration", best_it)
            log.info("RL resumed at iteration %d", it)
        logger.rewind({"rl": it, "val": it})  # also when a killed attempt logged iterations but saved none (it = 0)
        _rewind_samples(out, it)
        applied = int(jax.device_get(state.step))  # optimizer updates so far: the schedule's position
        guards = r.guards
        if guards.enabled and guards.max_tokens is None:  # `too_long`: cut by the rollout's cap (it never
            guards = dataclasses.replace(guards, max_tokens=samp.max_new_tokens)  # flagged: no limit; helper review)
        reward_fn = make_reward_fn(grader, data.train_items, model.tokenizer, guards=guards,
                                   stop_sequences=samp.stop_sequences, eos_ids=samp.eos_ids)
        exp_fn = make_experience_fn(model.config, r.ppo, reward_fn, samples_per_prompt=samp.n)
        step_fn = make_ppo_step(model.config, tx, r.ppo)
        peak = measured_peak_flops(dtype=model.config.dtype)
        if r.ppo.experience_from_rollout and model.config.dtype != "float32":
            log.warning("rl.ppo.experience_from_rollout with dtype=%s: the rollout's log-probs round differently from "
                        "the training forward's (SmolLM2-135M in bf16: 0.03 nats per token on average, up to 0.27), so "
                        "logp_old is off by that and the first KL to the reference is not 0; the default (false) "
                        "recomputes them", model.config.dtype)
        buckets = completion_buckets(samp.max_new_tokens, r.completion_buckets)
        bar = _bar(r.iterations, f"RL ({r.ppo.algo})", it, progress)
        stopped_early = lambda: bool(r.early_stop_patience) and since_best >= r.early_stop_patience  # noqa: E731
        stop.check()  # an interrupt between phases (all processes decide together)
        while it < r.iterations and not stop.agreed and not stopped_early():  # (resumed after an early stop: done)
            batch = next(loader)
            t0, c0 = time.perf_counter(), xla_cache.busy_seconds()
            p0 = compiles.programs() if compiles is not None else 0
            rng = jax.random.fold_in(jax.random.key(cfg.seed + 3), it)
            ro = rollout(state.params["policy"], batch["prompt_tokens"], batch["prompt_mask"], rng,
                         model_cfg=model.config, cfg=samp,
                         value_head=state.params.get("value_head") if r.ppo.experience_from_rollout else None)
            ro = trim_to_bucket(ro, buckets)  # (reads the longest row on the host: the rollout has finished)
            t_roll = time.perf_counter() - t0
            idx = jnp.repeat(batch["example_idx"], samp.n)
            exp, em = exp_fn(state.params, ref_params, ro, idx)
            jax.block_until_ready(em)  # the ordered grader callback: block per step (see graders.callback)
            broken = reward_fn.last.error or every_one_faulted(reward_fn.last.grades)
            if from_process_0(np.asarray(broken is not None)):  # (RL rows are graded where the callback runs)
                # an update on rewards that are all grader errors trains on the KL penalty (and value loss) alone: a
                # judge that died mid-run went on so to the end, exit 0 (review F, session 42)
                raise GraderFailure(failure_message(
                    f"RL iteration {it + 1}", f"{len(reward_fn.last.grades)} rows" if broken is not None else "rows",
                    broken, "stopped before this iteration's update, which would have trained on rewards of 0"))
            t_exp = time.perf_counter() - t0
            state, pm = step_fn(state, exp)
            pm = jax.device_get(pm)
            dt = time.perf_counter() - t0
            # compilation in this iteration (the first, a new completion bucket): out of the rates, logged apart
            compile_s = min(xla_cache.busy_seconds() - c0, dt)
            run_s = max(dt - compile_s, 1e-9)
            em = jax.device_get(em)
            applied += int(pm["updates"]) - int(pm["skipped"])
            pm["lr"] = schedule_value(r.optim, total, max(applied - 1, 0))  # that of the iteration's last update
            gen_tokens = float(em["response_length"]) * ro.tokens_BxN.shape[0]
            prompt_lens, gen_lens = to_host((ro.prompt_mask_BxP.sum(axis=1), ro.lengths_B))
            flops = rl_iteration_flops(model.config, prompt_lens, gen_lens, samp.n, samp.n if r.ppo.share_prompt else 1,
                                       r.ppo.experience_from_rollout, r.ppo.ppo_epochs, reference=r.ppo.kl_coef != 0,
                                       separate_critic=r.ppo.critic == "separate")
            metrics = {**em, **pm, "seconds": dt, "compile_seconds": compile_s, "rollout_seconds": t_roll,
                       "experience_seconds": t_exp - t_roll, "update_seconds": dt - t_exp,  # (grading: in experience)
                       "completion_bucket": ro.tokens_BxN.shape[1],
                       "grader_seconds": reward_fn.last.seconds, "generated_tokens_per_s": gen_tokens / run_s,
                       "mfu": flops / run_s / peak,
                       # rows graded, rows without an answer (or a failed program), rows the grader could not grade
                       # (always); rows each guard flagged (rl.guards)
                       **{_COUNTER_NAMES.get(k, f"guard_{k}"): v for k, v in reward_fn.last.counters.items()},
                       **sub_score_means(reward_fn.last.grades)}
            if compiles is not None:
                metrics["xla_programs"] = compiles.programs()
                metrics["iteration_programs"] = metrics["xla_programs"] - p0
            it += 1
            logger.log("rl", it, metrics)
            _dump_samples(out, it, reward_fn.last, data.train_items, samp.n, r.samples_per_iteration)
            bar.update(1)
            metric = None
            if r.eval_every and (it % r.eval_every == 0 or it == r.iterations):
                res = evaluate(state.params["policy"], model.config, model.tokenizer, data.val_ds, data.val_items,
                               grader, dataclasses.replace(cfg.eval, voting_k=0), mesh=mesh,
                               eos_ids=samp.eos_ids, pad_id=samp.pad_id, stop_sequences=samp.stop_sequences)
                check_evaluation(f"val_rl_{it}", res)  # (before the iteration's save: a rerun redoes it)
                _record_eval(out, f"val_rl_{it}", res, logger, "val", it)
                metric = res[selection_metric(cfg)]
                if metric > best:
                    best, since_best, best_it = metric, 0, it
                else:
                    since_best += 1
            # the last validation figure and the best one beside the rollout's: what selects the kept checkpoint
            last_val = metric if metric is not None else last_val
            bar.set_postfix(reward=f"{em['reward']:.3f}", kl=f"{em['kl']:.3f}",
                            **({"val": f"{last_val:.3f}"} if last_val is not None else {}),
                            **({"best": f"{best:.3f}"} if best >= 0 else {}))
            extras = {"loader": loader.state(), "iteration": it, "best": best, "since_best": since_best,
                      "best_iteration": best_it, "phase": "rl"}
            # every iteration, before the save decision; at once (`check`): the iteration has waited for its device
            # work already, and `poll`'s lag would run a whole iteration more in a preemption's grace (regression
            # review)
            interrupted = stop.check()
            if interrupted or metric is not None or it % cfg.checkpoint.save_every == 0 or it == r.iterations:
                manager.save(it, state, extras, metric=metric, force=True)
            if stopped_early():
                log.info("early stopping at iteration %d (no validation gain in %d evaluations)", it, since_best)
        bar.close()
        manager.wait()
        done = it >= r.iterations or stopped_early()
        # the best policy is read back (a whole model from disk) only for a finished phase: not in a preemption's grace;
        # and after the optimizer state is let go (Adam's two moments were alive beside it: a fifth model-sized copy at
        # the end of RL, memory review, session 29)
        policy = state.params["policy"]
        del state
        best_params = None
        if done:
            best_params, best_it = _best_policy(manager, policy, ref_params, best_it, floor)
        else:
            best_it = None
    return policy, best_params, it, done, best_it


def _best_policy(manager: ckpt.Checkpointer, policy, ref_params, best_it: int | None, floor: float | None):
    """(params, RL iteration) of a finished RL phase's best policy: read back from the best kept checkpoint, or
    the warm-up's `ref_params` (iteration 0) when the warm-up competes (`floor`: its validation figure) and no
    readable RL checkpoint beats it; (None, None) when there is no best (`policy`: the restore target)."""
    if floor is not None and best_it == 0:  # no RL validation beat the warm-up's
        return ref_params, 0
    # a damaged best step falls back to the next best only while it beats the warm-up; none: the warm-up
    best_params, best_it = manager.restore_best_params(policy, above=floor)
    if _any_process(best_params is None):  # every process takes the same fallback (one may fail to read)
        if floor is not None:
            log.warning("no RL checkpoint above the warm-up's validation figure could be read: hf/best and the "
                        "after-ReFT test are the warm-up")
        return (ref_params, 0) if floor is not None else (None, None)
    return best_params, best_it


def run_rerank(cfg: ExperimentConfig, model, sft_params, data: Data, grader, mesh, out: pathlib.Path, logger,
               stop: _Interrupt, progress: bool):
    """The verifier phase (ReFT's reranker, `reftjax.rerank`); returns its params, or None if interrupted.

    Samples `samples_per_question` solutions per training question from the warm-up policy
    (saved once to `verifier_data.npz`), then trains a classifier initialised from the same
    policy for `epochs` passes, checkpointed like the other phases (`checkpoints/verifier`)."""
    rc = cfg.rerank
    marker, data_path = out / "verifier_done.json", out / "verifier_data.npz"
    vdir = out / "checkpoints" / "verifier"
    # restores go onto shapes and shardings only: no copy of the backbone (nor, resuming, optimizer state)
    abstract = abstract_verifier(sft_params, model.config, jax.random.key(rc.seed))
    if marker.exists():
        return ckpt.restore_params(vdir / str(json.loads(marker.read_text())["step"]), abstract, key="verifier")
    if data_path.exists():
        vd = VerifierData.load(data_path)
    else:
        n = len(data.train_ds) if rc.n_questions is None else min(rc.n_questions, len(data.train_ds))
        bar = _bar(n, "verifier data", 0, progress)
        vd = sample_verifier_data(sft_params, model.config, model.tokenizer, data.train_ds, data.train_items, grader,
                                  rc, mesh=mesh, eos_ids=_eos_ids(cfg, model),
                                  stop_sequences=cfg.rl.sampling.stop_sequences,
                                  pad_id=model.tokenizer.pad_token_id, progress=bar)
        bar.close()
        if is_primary():
            vd.save(data_path)
        logger.log("verifier_data", 0, {"rows": len(vd), "questions": len(set(vd.example_idx.tolist())),
                                        "positive_fraction": float(vd.labels.mean())})
    per_epoch = -(-len(vd) // rc.batch_size)
    total = rc.epochs * per_epoch
    tx = make_optimizer(rc.optim, total)
    key = jax.random.key(rc.seed + 1)
    with ckpt.Checkpointer(ckpt.CheckpointConfig(str(vdir), save_every=cfg.checkpoint.save_every,
                                                 keep_last=cfg.checkpoint.keep_last, keep_best=0),
                           config=to_dict(cfg)) as manager:
        done = 0
        restored = manager.restore_latest(init_state({"verifier": abstract}, tx, key, abstract=True))
        if restored is None:
            state = init_state({"verifier": init_verifier(sft_params, model.config, jax.random.key(rc.seed))}, tx, key)
        else:
            state, extras, _ = restored
            done = extras["step"]
            log.info("verifier training resumed at step %d", done)
        logger.rewind({"verifier": done})
        step_fn = make_verifier_step(model.config, tx, rc.token_level)
        n_proc, pid = jax.process_count(), jax.process_index()
        local = rc.batch_size // n_proc
        bar = _bar(total, "verifier", done, progress)
        prev = None
        stop.check()  # an interrupt between phases (all processes decide together)
        while done < total and not stop.agreed:
            epoch, pos = divmod(done, per_epoch)
            for i, batch in enumerate(vd.batches(rc.batch_size, seed=rc.seed + epoch)):
                if i < pos:
                    continue
                batch = shard_batch({k: v[pid * local:(pid + 1) * local] for k, v in batch.items()}, mesh)
                state, metrics = step_fn(state, batch)
                if prev is not None:  # read the previous step's metrics one step late (no wait on the device)
                    logger.log("verifier", prev[0], {**jax.device_get(prev[1]), "epoch": prev[2]})
                done += 1
                prev = (done, metrics, epoch + 1)
                bar.update(1)
                interrupted = stop.poll()  # every step, before the save decision
                if interrupted or done % cfg.checkpoint.save_every == 0 or done == total:
                    # its line before the checkpoint that covers it
                    logger.log("verifier", prev[0], {**jax.device_get(prev[1]), "epoch": prev[2]})
                    prev = None
                    manager.save(done, state, {"step": done, "phase": "verifier"}, force=True)
                if stop.agreed:
                    break
        if prev is not None:
            logger.log("verifier", prev[0], {**jax.device_get(prev[1]), "epoch": prev[2]})
        bar.close()
        if done >= total:
            manager.keep_only(done)  # what verifier_done.json names: all a rerun reads
    if done < total:
        return None
    _write_json(marker, {"step": done})
    return state.params["verifier"]


def _rewind_samples(out: pathlib.Path, it: int) -> None:
    """Drops the dumped rollouts of iterations after `it` (a resumed RL phase redoes them), and a last line cut by
    a crash. The file is appended in iteration order and can grow to gigabytes over a long run, so it is never read
    into memory: when its last line is whole and of iteration <= `it` (the usual resume) nothing more is read;
    otherwise it is copied line by line without the dropped rows and put in place atomically."""
    path = out / "samples" / "rl_rollouts.jsonl"
    if not is_primary() or not path.exists():
        return

    def keep(line: bytes) -> bool:
        row = _json_or_none(line)
        return isinstance(row, dict) and row.get("iteration", 0) <= it

    last = _last_line(path)
    if last is None or (last.endswith(b"\n") and keep(last)):
        return
    tmp = path.with_suffix(".tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for line in src:
            if keep(line):
                dst.write(line if line.endswith(b"\n") else line + b"\n")
    tmp.replace(path)


def _last_line(path: pathlib.Path, block: int = 1 << 16) -> bytes | None:
    """The file's last line (with its newline, if it has one), read backwards a block at a time; None when empty."""
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        if end == 0:
            return None
        tail, pos = b"", end
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            tail = f.read(pos - start) + tail
            pos = start
            cut = tail.rfind(b"\n", 0, len(tail) - 1)  # the newline before the last line
            if cut >= 0:
                return tail[cut + 1:]
        return tail


def _json_or_none(line: str | bytes):
    try:
        return json.loads(line)
    except ValueError:  # a line cut by a crash
        return None


def _dump_samples(out: pathlib.Path, it: int, record, items: list, n: int, k: int = -1):
    """Appends the first `k` rows (-1: all) of iteration `it`'s graded rollout: which item and which of its `n`
    samples each row is, the completion and its grade."""
    if not is_primary() or k == 0:
        return
    (out / "samples").mkdir(exist_ok=True)
    rows = len(record.grades) if k < 0 else min(k, len(record.grades))
    texts = record.texts or ("",) * len(record.grades)  # a batch that failed as a whole has no texts
    with open(out / "samples" / "rl_rollouts.jsonl", "a") as f:
        for r in range(rows):
            g, idx = record.grades[r], record.example_idx[r] if record.example_idx else None
            row = {"iteration": it, "item_id": None if idx is None else items[idx].get("item_id"), "sample": r % n,
                   "completion": texts[r], "score": g.score, "extracted": g.extracted, "error": g.error}
            if "scores" in g.details:  # a multi grader's sub-scores, by name
                row["scores"] = g.details["scores"]
            if "guards" in g.details:  # flagged by the reward-hacking guards (rl.guards)
                row.update(guards=g.details["guards"], score_before_guards=g.details["score_before_guards"])
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- the pipeline


def _verifier_for(cfg: ExperimentConfig, name: str, model, sft_params, data: Data, grader, mesh,
                  out: pathlib.Path, logger, stop: _Interrupt, progress: bool):
    """The verifier for evaluation `name`: None when reranking is off or `name` already holds its rerank@k
    figures, False when the phase was interrupted; else trained (or resumed, or restored) by `run_rerank`."""
    if not cfg.rerank.epochs or "rerank_accuracy" in _load_evals(out).get(name, {}):
        return None
    verifier = run_rerank(cfg, model, sft_params, data, grader, mesh, out, logger, stop, progress)
    return False if verifier is None else verifier


def _eos_ids(cfg: ExperimentConfig, model) -> tuple[int, ...]:
    """The run's EOS ids: rl.sampling.eos_ids, else the model's. RL rollouts, validation, test and the verifier's
    samples all stop by this one rule (test used the model's alone, so selection and test could differ). The model's
    ids gain the token the warm-up's targets end with: the template's end of turn in the chat styles, the
    tokenizer's EOS in the plain ones."""
    if cfg.rl.sampling.eos_ids:
        return tuple(cfg.rl.sampling.eos_ids)
    ids = tuple(model.config.eos_token_ids)
    # the token the warm-up's targets end with: the template's end of turn, or the tokenizer's EOS in the plain
    # styles (a ChatML fine-tune of a base model: <|im_end|> there, <|endoftext|> in config.json; review, session 28)
    chat = cfg.data.prompt.style.startswith("chat")
    last = (end_of_turn_id(model.tokenizer, **cfg.data.prompt.template_kwargs) if chat
            else getattr(model.tokenizer, "eos_token_id", None))
    if last is not None and last not in ids:
        ids += (last,)
    return ids


def _export_generation_config(cfg: ExperimentConfig, model):
    """The generation config exported with the policy: its EOS ids are the run's (`_eos_ids`), so transformers'
    `generate` on hf/final stops where the run's rollouts and evaluations stopped. In the chat styles the warm-up
    teaches the template's end of turn, which a base model's EOS need not be: the loaded ids alone were exported and
    generate ran past the answer (regression review). Stop strings are not exported (transformers' `stop_strings`
    need a tokenizer passed to every generate call)."""
    import copy

    from transformers import GenerationConfig

    ids = list(_eos_ids(cfg, model))
    gen = model.generation_config
    have = gen.eos_token_id if gen is not None else getattr(model.hf_config, "eos_token_id", None)
    have = [] if have is None else list(have) if isinstance(have, (list, tuple)) else [have]
    if set(have) == set(ids):
        return gen
    gen = copy.deepcopy(gen) if gen is not None else GenerationConfig.from_model_config(model.hf_config)
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    return gen


def _eval_once(name, out, logger, params, model, ds, items, grader, cfg, mesh, step, voting=False, verifier=None):
    evals = _load_evals(out)
    if name in evals and (verifier is None or "rerank_accuracy" in evals[name]):
        return evals[name]
    ecfg = cfg.eval if voting else dataclasses.replace(cfg.eval, voting_k=0)
    res = evaluate(params, model.config, model.tokenizer, ds, items, grader, ecfg, mesh=mesh,
                   eos_ids=_eos_ids(cfg, model), pad_id=model.tokenizer.pad_token_id, verifier=verifier,
                   stop_sequences=cfg.rl.sampling.stop_sequences,
                   # the voting samples follow --seed (they drew key 1234 whatever the seed); every evaluation of a
                   # run shares one key, so before and after ReFT are compared on the same randomness; seed 0 as before
                   rng=jax.random.key(1234 + cfg.seed))
    check_evaluation(name, res)
    _record_eval(out, name, res, logger, f"eval/{name}", step)  # one TensorBoard group per evaluation
    return {k: v for k, v in res.items() if k != "samples"}


def _copy_eval(out: pathlib.Path, logger, src: str, dst: str, step: int) -> None:
    """Records the evaluation `src` again as `dst` (its samples, metrics line and entry, marked `same_as`): for a
    `dst` of the same weights, sampling key and verifier, which `evaluate` would only repeat. Process 0 decides
    whether it is recorded already: every process writes evals.json, and a faster one's write of `dst` made process 0
    skip the metrics line (a broadcast: no process writes before process 0 has read)."""
    evals = _load_evals(out)
    if from_process_0(np.asarray(dst in evals)):
        return
    path = out / "samples" / f"{src}.jsonl"
    samples = []
    if is_primary():
        if path.exists():
            samples = [json.loads(line) for line in path.read_text().splitlines()]
        else:
            log.warning("%s: missing; %s is recorded without samples", path, dst)
    _record_eval(out, dst, {**evals[src], "same_as": src, "samples": samples}, logger, f"eval/{dst}", step)


class SettingsError(ValueError):
    """Settings this machine's mesh cannot run (found before anything loads)."""


def with_rl_epochs_counted(cfg: ExperimentConfig, n_prompts: int) -> ExperimentConfig:
    """`cfg` with `rl.iterations` counted from `rl.epochs` over the `n_prompts` training prompts the length limits
    kept (`RLConfig.with_epochs_counted`; unchanged when `rl.epochs` is null), said in the log."""
    rl = cfg.rl.with_epochs_counted(n_prompts)
    if rl is cfg.rl:
        return cfg
    log.info("rl.epochs=%d: %d RL iterations (%d training prompts // rl.prompts_per_iteration=%d = %d an epoch)",
             rl.epochs, rl.iterations, n_prompts, rl.prompts_per_iteration, n_prompts // rl.prompts_per_iteration)
    return dataclasses.replace(cfg, rl=rl)


def check_train_size(cfg: ExperimentConfig, data: Data) -> None:
    """The SFT and RL loaders draw full batches of training examples: too few are refused before anything runs (they
    failed after the warm-up and the evaluations, and the corrected rerun was refused by the claimed run directory)."""
    d = cfg.data
    for name, size, runs in (("sft.batch_size", cfg.sft.batch_size, cfg.sft.epochs > 0),
                             ("rl.prompts_per_iteration", cfg.rl.prompts_per_iteration, cfg.rl.runs)):
        if runs and len(data.train_ds) < size:
            raise DataError(f"{d.train_file or d.dataset}:0: the train split keeps {len(data.train_ds)} examples "
                            f"({data.train_ds.stats.get('examples', len(data.train_ds))} before the length limits), "
                            f"fewer than one batch of {name}={size}: lower it or give more training data")


def check_grader_fields(grader, data: Data | Splits) -> None:
    """The grader can read the fields of every split's items (the test split is a built-in dataset whose items
    carry `item_id`, `question` and `answer_value`, whatever the training file holds): a grader reading another
    field failed at the first test evaluation, after the warm-up, with the run directory already claimed.
    Every item is checked, not the first alone: a row that lacks the field (a typo in one line of the file) scored
    0 for every answer, counted with the unparseable ones.
    """
    for split, items in (("train", data.train_items), ("validation", data.val_items), ("test", data.test_items)):
        bad = []
        for i, item in enumerate(items):
            try:
                grader.validate(item)
            except (KeyError, ValueError) as e:
                bad.append((i, item, e.args[0] if isinstance(e, KeyError) and e.args else e))
        if bad:
            i, item, msg = bad[0]
            # the file and line of the first (it said an item_id, which a file without ids numbers from 0; review)
            line = data.where.get(split, [""] * len(items))[i]
            where = "all" if len(bad) == len(items) else f"{len(bad)} of {len(items)}, the first item_id " \
                                                          f"{item.get('item_id')!r}"
            default_test = " (the test split is GSM8K's unless data.test_file names one)" \
                if split == "test" and not line else ""
            raise SettingsError(f"{line + ': ' if line else ''}grader: cannot grade the {split} split's items "
                                f"({where}: {msg}){default_test}; such items have the fields {sorted(item)} "
                                f"(item_id, question and answer_value are reftjax's; data.answer_field is read into "
                                f"answer_value)")


def check_batch_sizes(cfg: ExperimentConfig, mesh) -> None:
    """Every batch the run loads is split over the mesh's batch axes (data x fsdp), and their devices over the
    processes: refuse sizes they do not divide before anything loads (they failed in the first step of a phase,
    possibly after hours of warm-up, with a raw IndivisibleError)."""
    shards = batch_devices(mesh)
    n_proc = jax.process_count()
    if shards % n_proc:
        raise SettingsError(f"mesh: the batch axes {BATCH_AXES} span {shards} devices, not a multiple of the {n_proc} "
                         f"processes (each process loads its share of every batch); change mesh.data/mesh.fsdp")
    sizes = {"eval.batch_size": cfg.eval.batch_size}
    if cfg.sft.epochs:
        sizes["sft.batch_size"] = cfg.sft.batch_size
    if cfg.rl.runs:
        sizes["rl.prompts_per_iteration"] = cfg.rl.prompts_per_iteration
    if cfg.rerank.epochs:  # (rerank.prompts_per_batch is rounded up to a multiple: `sample_verifier_data`)
        sizes["rerank.batch_size"] = cfg.rerank.batch_size
    bad = {k: v for k, v in sizes.items() if v % shards}
    if bad:
        named = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise SettingsError(f"{named}: must be a multiple of the {shards} devices of the mesh's batch axes "
                            f"{BATCH_AXES} (mesh {dict(mesh.shape)})")


class RunDirError(ValueError):
    """The output directory holds a run this config cannot continue."""


# Settings a rerun may change: where and how often it saves and caches, and how the same computation is laid out
# on the devices and in memory (a run preempted on one slice may resume on another, or with remat to fit);
# entries ending in "." cover a whole sub-config.
RESUMABLE_CHANGES = ("compilation_cache", "export_hf", "export_dtype", "checkpoint.save_every", "checkpoint.keep_last",
                     "mesh.", "remat", "sft.accum_steps", "sft.head_chunk_rows", "rl.ppo.head_chunk_rows",
                     "rl.samples_per_iteration")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# where the model and the data files are read from: free to change when data.json holds the digests of the weights
# and the data, which `_check_same_data` compares once they are loaded (a copy of the model folder at another path,
# another slice's mount point: refused by path before; helper review)
LOCATIONS = ("model", "data.train_file", "data.val_file", "data.test_file")


# settings added with a default that is not (always) what runs begun before them did: key -> the values that keep
# such a run's behaviour, from its flat config, the first named in messages. Voting@k grouped answers within 1e-2
# until session 27 made equal values the default; no BOS was added before data.prompt.bos, and its null adds none
# where the tokenizer adds none (where it adds one, the data digests of `_check_same_data` refuse the change). The
# best RL checkpoint was kept whatever the warm-up scored before rl.best_includes_warmup.
_EARLIER = {"eval.voting_tol": lambda old: (0.01 if old.get("eval.voting_k") else 0.0,),
            "data.prompt.bos": lambda old: (False, None),
            "rl.best_includes_warmup": lambda old: ((False,) if old.get("rl.eval_every") and old.get("rl.iterations")
                                                    and old.get("checkpoint.keep_best", 1) else (False, True))}
# (rl.best_includes_warmup has no effect without RL validation or a kept best)


def keep_earlier_settings(cfg: ExperimentConfig, out: str | pathlib.Path, given=frozenset()) -> ExperimentConfig:
    """`cfg` with each setting that reftjax added since the run in `out` began (its config.json lacks it) and that
    `given` (the dotted settings the user chose) does not name at the value that keeps what that run did
    (`_EARLIER`): `run` refuses the new default there, so the CLI and the notebook pass their config through this
    and the same command still resumes such a run."""
    try:
        began = json.loads((pathlib.Path(out) / "config.json").read_text())
    except (OSError, ValueError):
        return cfg
    if not isinstance(began, dict):  # (not a config: `run` says so)
        return cfg
    old, d = _flat(began), to_dict(cfg)
    kept = {}
    for key, earlier in _EARLIER.items():
        *head, last = key.split(".")
        node = functools.reduce(dict.__getitem__, head, d)
        if key not in old and key not in given and node[last] not in earlier(old):
            node[last] = kept[key] = earlier(old)[0]
    if not kept:
        return cfg
    # (a warning: it decides what the run does, and the notebook shows no INFO lines)
    log.warning("the run in %s began before these settings; kept at what it did (set them to choose): %s", out,
                ", ".join(f"{k}={json.dumps(v)}" for k, v in kept.items()))
    return from_dict(d)


def check_evaluation(name: str, res: dict) -> None:
    """Raises GraderFailure when the grader failed on every answer of the evaluation `name` (`evaluate`'s result):
    its figures would be 0 whatever the model wrote. A validation of 0 counted against early stopping (a judge down
    for a while ended the run) and a test figure of 0 went into the summaries as measured (session 43). Called
    before the evaluation is recorded: a rerun redoes it. Every process decides alike (`grader_errors` and `n` are
    process 0's figures)."""
    n, errors = int(res.get("n") or 0), int(res.get("grader_errors") or 0)
    if n and errors >= n:
        raise GraderFailure(failure_message(f"evaluation {name}", f"{n} answers", res.get("grader_failure"),
                                            "stopped before recording it, which would have scored 0 whatever the "
                                            "model wrote"))
    if "voting_grader_failure" in res:  # (set by `evaluate` on every process: they all hold process 0's grades)
        raise GraderFailure(failure_message(f"evaluation {name}", f"{res['voting_samples']} voting samples",
                                            res["voting_grader_failure"], "stopped before recording it, which would "
                                            "have scored voting@k 0 whatever the model wrote"))


JUDGE_TRANSPORT = ENDPOINT_KEYS  # free on resume: how a grader reaches its judge or embeddings, not what it asks
_JUDGES = ("score_model", "label_model")


def _asks_endpoint(g: dict) -> bool:
    """Whether a grader config asks an endpoint: a judge, or text_similarity's cosine (embeddings)."""
    return g.get("type") in _JUDGES or (g.get("type") == "text_similarity" and g.get("evaluation_metric") == "cosine")


_REFT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ReftGrader) if f.name != "pool"}


def _grader_defaults(g: dict) -> dict:
    """A grader config with the fields it leaves out at the values its grader takes, inside `multi` graders too: a
    run begun with `{"type": "reft", "cot": "nl"}` (the presets) and rerun with `{"type": "reft"}` is the same grader,
    and was refused as `grader.cot: "nl" -> "<unset>"` (session 55's mutation review). Model graders drop OpenAI's
    nulls ("not set") and take their default range and sampling parameters (`graders.judge.build_model_grader`), a
    cosine grader its default embedding model (`graders.judge.build_cosine_grader`)."""
    kind = g.get("type")
    if kind in ("reft", "gsm8k"):
        return {**_REFT_DEFAULTS, **(GSM8K_FIELDS if kind == "gsm8k" else {}), **g}
    if kind in _JUDGES:
        g = {k: v for k, v in g.items() if v is not None}
        return {"sampling_params": {}, **({"range": [0, 1]} if kind == "score_model" else {}), **g}
    if _asks_endpoint(g):
        return {"model": DEFAULT_EMBEDDING_MODEL, **{k: v for k, v in g.items() if v is not None}}
    if kind == "multi" and isinstance(g.get("graders"), dict):
        return {**g, "graders": {name: _grader_defaults(sub) if isinstance(sub, dict) else sub
                                 for name, sub in g["graders"].items()}}
    return g


def _comparable(d):
    """A config dict with its grader as an object and the chat template's variables as sorted (name, value) pairs,
    whichever form it holds them in: the presets hold the grader as pairs, `--set grader=` as an object, and the
    same grader in the other form was refused as a changed setting (`grader: [["type", "reft"], ["cot", "nl"]] ->
    "<unset>", ...`; session 46). config.json holds both as objects since session 53 (`config.to_json`), runs begun
    before as `to_dict` gave them; the variables compare as pairs, by JSON type (`_check_same_run`)."""
    if not isinstance(d, dict):
        return d
    g = d.get("grader")
    if isinstance(g, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in g):
        g = dict(g)
    if isinstance(g, dict):
        d = {**d, "grader": _grader_defaults(g)}
    data = d.get("data")
    prompt = data.get("prompt") if isinstance(data, dict) else None
    if isinstance(prompt, dict) and isinstance(prompt.get("chat_template_kwargs"), dict):
        pairs = [[k, v] for k, v in sorted(prompt["chat_template_kwargs"].items())]
        d = {**d, "data": {**data, "prompt": {**prompt, "chat_template_kwargs": pairs}}}
    return d


def _check_same_run(cfg_path: pathlib.Path, new: dict, content_checked: bool = False) -> None:
    """Refuses to resume a run directory under different settings (besides `RESUMABLE_CHANGES`, and `LOCATIONS`
    when `content_checked`: the run's data.json records the digests of what they hold). A setting the stored
    config lacks (added to reftjax since the run began) passes at the value that keeps the earlier behaviour: its
    default, or `_EARLIER`'s where the default changed what such a run did.

    A rerun continues from checkpoints and reuses the finished phases (`sft_done.json`, `evals.json`, the
    verifier), so changed settings would give a run that follows neither config: cached test figures of
    another policy, a learning-rate schedule sized for another length, a data order that no longer matches.
    """
    try:
        old = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{cfg_path}: unreadable ({type(e).__name__}: {e}); this run directory cannot be "
                          f"resumed: use a new output directory") from e
    a, b = _flat(_comparable(old)), _flat(_comparable(new))
    defaults = _flat(_comparable(to_dict(ExperimentConfig())))
    def earlier(k):  # the values of a setting added since the run began that keep what it did: its default, but
        return _EARLIER[k](a) if k in _EARLIER else (defaults.get(k, "<unset>"),)  # for _EARLIER
    def free(k):
        if k not in a and k in defaults and b[k] in earlier(k):
            return True  # a setting added since the run began, at a value that keeps the earlier behaviour (runs from
            # before data.val_file were refused)
        parent, _, leaf = k.rpartition(".")
        if k.startswith("grader.") and leaf in ("pass_threshold", "range") and k not in b and \
                a.get(parent + ".type") != "score_model":  # (whose range maps its scores since session 42)
            return True  # accepted and ignored before session 35, refused since: the run did without them (review)
        if k.startswith("grader.") and leaf in JUDGE_TRANSPORT and \
                _asks_endpoint({f: a.get(f"{parent}.{f}") for f in ("type", "evaluation_metric")}):
            return True  # how a model grader reaches its judge (a server restarted on another port), not what it asks
        if k.startswith("rerank.") and not a.get("rerank.epochs") and not b.get("rerank.epochs"):
            return True  # the verifier phase is off in both: its settings change nothing (a preset's did)
        if k == "rl.iterations" and a.get("rl.epochs") is not None and b.get("rl.epochs") is not None:
            return True  # not read where rl.epochs decides the length (a preset's changed)
        if k in LOCATIONS:  # a path to another path; null <-> a path changes what is read (a held-out split, GSM8K)
            return content_checked and a.get(k) is not None and b.get(k) is not None
        return any(k == c or (c.endswith(".") and k.startswith(c)) for c in RESUMABLE_CHANGES)
    def differ(k):  # (the chat template's variables by JSON type too: jinja's `x is false` tells false from 0, and
        # Python's == did not, so the refusal came late, from the data digests, blaming the data; regression review)
        old, new = a.get(k, "<unset>"), b.get(k, "<unset>")
        return old != new or (k == "data.prompt.chat_template_kwargs" and json.dumps(old) != json.dumps(new))
    diffs = [k for k in sorted(a.keys() | b.keys()) if differ(k) and not free(k)]
    if diffs:
        shown = ", ".join(f"{k}: {json.dumps(a[k]) if k in a else f'<unset, i.e. {json.dumps(earlier(k)[0])}>'} -> "
                          f"{json.dumps(b.get(k, '<unset>'))}" for k in diffs[:6])
        shown += f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
        raise RunDirError(f"{cfg_path}: this run directory holds a run with other settings ({shown}); rerunning "
                          f"resumes it, so rerun with the same settings (they are in that file) or use a new "
                          f"output directory")


def _has_model_digest(path: pathlib.Path) -> bool:
    """Whether a run's data.json records the digests of the weights and of the model's configuration (runs started
    before it did are checked by path: the weights alone let a config.json with other norms or EOS ids through)."""
    try:
        return {"params", "config"} <= set(json.loads(path.read_text()).get("model", {}))
    except (OSError, ValueError, AttributeError):
        return False


def _interrupted(finish_log, phase: str) -> dict:
    """The summary of a run stopped by an interrupt in `phase` (its step is saved; rerunning resumes);
    `finish_log` logs the invocation's last row and closes the log."""
    finish_log()
    return {"status": "interrupted", "phase": phase}


@contextlib.contextmanager
def _claimed(out: pathlib.Path, made: list = ()):
    """Holds an exclusive lock on the run directory (`out/.lock<process index>`) while this process runs in it: a
    second run started on the same directory (a resume typed while the first still runs, a scheduler's duplicate)
    would append to the same metrics and samples files and save checkpoints of the same steps. The kernel drops
    the lock when the process ends, SIGKILL included, so a crashed run never leaves a stale claim.

    The refusal is collective: with several processes each locks its own file, so one may find its lock held (a
    one-process run holds `.lock0` alone) while another gets its own; that one entered the run's collectives
    alone and hung (regression review). Every process now raises when any was refused.

    `made`: the folders this invocation created for `out` (deepest first); a run that fails before it writes
    `config.json` removes them while it still holds the lock (`_remove_unclaimed`). A refused run removes nothing:
    the folder is the running one's, even when this invocation's `mkdir` raced it (regression review)."""
    try:
        import fcntl
    except ImportError:  # (Windows) run, unguarded
        fcntl = None
        log.warning("%s: file locks are not available here; nothing stops a second run from using this directory",
                    out)
    f = open(out / f".lock{jax.process_index()}", "a+")
    holder = None
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process"
        except OSError as e:  # a file system without locks (some network mounts): run, unguarded
            log.warning("%s: cannot lock the run directory (%s); nothing stops a second run from using it", out, e)
    refused = _any_process(holder is not None)
    if refused:
        f.close()
        whose = holder if holder is not None else (f"found by another process of this run; this is process "
                                                   f"{jax.process_index()}")
        raise RunDirError(f"{out}: another run is using this run directory ({whose}); wait for it to end, or use "
                          f"another output directory")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    f.flush()
    try:
        yield
    except BaseException:
        if made:
            _remove_unclaimed(out, made)
        raise
    finally:
        f.close()  # releases the lock (the file stays once a run began: removing it would race a process about to
        # lock it; before, `_remove_unclaimed` takes that small risk for a folder this invocation made)


def run(cfg: ExperimentConfig, out_dir: str | pathlib.Path, *, progress: bool = True) -> dict:
    """Run (or resume) the whole ReFT pipeline; returns the summary dict (summary.json's), or, when Ctrl-C or
    SIGTERM stopped it at a checkpoint, `{"status": "interrupted", "phase": ...}` (rerun to resume). One run at a
    time per directory: a second one started while the first runs stops with a RunDirError."""
    if "://" in str(out_dir):  # pathlib folds gs://b/run into a local gs:/b/run, found at the first checkpoint
        raise RunDirError(f"{out_dir}: the output directory must be a local (or mounted) path; URLs are not "
                          f"supported (mount the bucket, e.g. with gcsfuse, and pass the mount's path)")
    t_start = time.time()  # the invocation's wall time counts its start-up (model load, tokenization) too
    maybe_initialize_distributed()
    xla_cache.enable(cfg.compilation_cache)
    out = pathlib.Path(out_dir)
    made = [p for p in (out, *out.parents) if not p.exists()]  # the folders this invocation creates, deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (the bare "[Errno 2] No such file or directory: '/proc/x'" named no setting; review)
        _remove_empty(made)  # (the parents it did make: a name too long for the last one left them)
        raise RunDirError(f"{out}: cannot create the output directory (--out): {e.strerror or e}") from None
    with _claimed(out, made):
        return _run(cfg, out, progress, t_start)


def _remove_unclaimed(out: pathlib.Path, made: list) -> None:
    """After a failure before the run wrote `config.json`, while this process still holds its lock: removes its lock
    file, then `made` (the folders this invocation created, deepest first), each only while empty (another
    process's lock, or anything a run wrote, keeps it: `rmdir` refuses). A failed run left its new folder behind
    holding `.lock0` (bad-input review, session 35)."""
    if (out / "config.json").exists():  # (a run began in it)
        return
    with contextlib.suppress(OSError):
        (out / f".lock{jax.process_index()}").unlink()
    _remove_empty(made)


def _remove_empty(folders: list) -> None:
    """`rmdir` of each of `folders` (deepest first), stopping at the first that is not empty (one that is not there,
    or whose name the file system refuses, is passed over)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return


def _run(cfg: ExperimentConfig, out: pathlib.Path, progress: bool, t_start: float) -> dict:
    from reftjax import report

    compiles = xla_cache.CompileStats()
    cfg_path = out / "config.json"
    ran = cfg_path.exists() and any(p.name not in ("config.json", "data.json") and not p.name.startswith(".lock")
                                    for p in out.iterdir())
    if ran:  # else nothing ran under it
        _check_same_run(cfg_path, to_dict(cfg), content_checked=_has_model_digest(out / "data.json"))
    # cheap checks first: a bad grader (its imports tried in its sandbox) or mesh fails before the model loads
    grader = build_grader(cfg.grader_dict, pool=default_pool(cfg.sandbox.sandbox_config()))
    check_imports(grader)
    check_wordnet(grader)  # METEOR's WordNet, loaded once here
    check_judges(grader)  # a judge endpoint that cannot be reached fails here, not as a run of zero rewards
    for line in reach_warnings(grader):
        log.warning("%s", line)
    mesh = make_mesh(cfg.mesh)
    check_batch_sizes(cfg, mesh)
    for name in ("train_file", "val_file", "test_file"):  # not after the model loads
        if (f := getattr(cfg.data, name)) and not pathlib.Path(f).is_file():
            raise DataError(f"{f}: no such file (data.{name})")
    # (records and the grader's fields: a bad line or field does not wait for the model)
    splits = read_splits(cfg, progress)
    check_grader_fields(grader, splits)
    model = load_model(cfg.model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat, mesh=mesh)
    loaded = model.config  # (digested as loaded: the pin is recorded apart, so a refusal names it)
    model = dataclasses.replace(model, config=pin_longrope(cfg, model.config))
    data = prepare_data(cfg, model.tokenizer, splits)
    del splits
    check_train_size(cfg, data)
    asked, cfg = cfg, with_rl_epochs_counted(cfg, len(data.train_ds))  # (config.json keeps what was asked)
    pinned = {"longrope": model.config.rope_scaling.factors} if loaded.rope_scaling.kind == "longrope" else {}
    prints = {**data_fingerprints(data), "model": {"params": model_fingerprint(model.params),
                                                   "config": model_config_fingerprint(loaded), **pinned}}
    data_path = out / "data.json"
    if ran and data_path.exists():
        _check_same_data(data_path, prints)
    _write_json(cfg_path, to_json(asked))  # once the model and data are in: a typo in either does not claim `out`
    _write_json(data_path, prints)
    logger = MetricsLogger(out)
    # marks where this invocation starts in metrics.jsonl (its start-up before the row too), and `end` where it ends
    # (after its exports or its interrupt's save): the summary adds up the time of every invocation. They were
    # counted from this row (after the model load and tokenization) to the last step's row (review, session 30).
    invocation = report.wall_times(read_metrics(out), t_start)[1] + 1
    logger.log("invocation", invocation, {"startup_seconds": time.time() - t_start})

    def finish_log():
        logger.log("end", invocation, {"seconds": time.time() - t_start})
        logger.close()

    stop = _Interrupt()
    with stop.installed():
        if cfg.eval_before_sft and cfg.sft.epochs > 0:  # without a warm-up, test_sft evaluates the loaded model
            _eval_once("test_base", out, logger, model.params, model, data.test_ds, data.test_items, grader, cfg,
                       mesh, 0)
        marker = out / "sft_done.json"
        if cfg.sft.epochs == 0:  # no warm-up: the loaded model is the reference and the policy's start
            ref_params = model.params
        elif marker.exists():  # the final SFT checkpoint is the frozen reference (and the policy's start)
            step = json.loads(marker.read_text())["step"]
            ref_params = ckpt.restore_params(out / "checkpoints" / "sft" / str(step), model.params)
        else:
            ref_params, sft_step = run_sft(cfg, model, data, mesh, out, logger, stop, progress)
            if sft_step is None:
                return _interrupted(finish_log, "sft")
            _write_json(marker, {"step": sft_step})
        # the loaded weights are the reference with no warm-up, else no longer needed: a resumed run held them beside
        # the reference and the policy through RL (a fresh one's were donated to the first SFT step)
        model = dataclasses.replace(model, params=None)
        if stop.check():  # between phases too: an evaluation (voting@k) can take longer than the phase before it
            return _interrupted(finish_log, "eval")
        val_sft = _eval_once("val_sft", out, logger, ref_params, model, data.val_ds, data.val_items, grader, cfg,
                             mesh, 0)
        verifier = _verifier_for(cfg, "test_sft", model, ref_params, data, grader, mesh, out, logger, stop, progress)
        if verifier is False:
            return _interrupted(finish_log, "rerank")
        if stop.check():
            return _interrupted(finish_log, "eval")
        _eval_once("test_sft", out, logger, ref_params, model, data.test_ds, data.test_items, grader, cfg, mesh, 0,
                   voting=True, verifier=verifier)
        del verifier  # not held through RL: restored from its checkpoint for the final test
        exports = {"final": ref_params}  # rl.iterations=0: the warm-up alone; no after-ReFT test of the same weights
        best_it = None
        if cfg.rl.iterations:
            final, best, rl_its, rl_done, best_it = run_rl(cfg, model, ref_params, data, grader, mesh, out, logger,
                                                           stop, progress, compiles,
                                                           warmup_val=val_sft.get(selection_metric(cfg)))
            if not rl_done:
                return _interrupted(finish_log, "rl")
            exports = {"final": final, "best": best if best is not None else final}
            verifier = None if best_it == 0 else _verifier_for(cfg, "test_reft", model, ref_params, data, grader, mesh,
                                                               out, logger, stop, progress)
            del ref_params  # done with (the verifier trained from it is in hand): a copy less for the test and exports
            if verifier is False:
                return _interrupted(finish_log, "rerank")
            if stop.check():
                return _interrupted(finish_log, "eval")
            if best_it == 0:  # the warm-up is the best: test_sft's evaluation is of the same weights, key and verifier
                _copy_eval(out, logger, "test_sft", "test_reft", rl_its)
            else:
                _eval_once("test_reft", out, logger, exports["best"], model, data.test_ds, data.test_items, grader,
                           cfg, mesh, rl_its, voting=True, verifier=verifier)  # (< rl.iterations after an early stop)
        if stop.check():  # (a signal during the final test was announced, then the exports ran; helper review)
            return _interrupted(finish_log, "eval")
    # a rerun of the finished run does not export again: process 0 exports, so its marker decides for all (to_host
    # below is a collective for sharded params, and every process must take the same branch)
    exported = out / "export_done.json"
    # (the dtype too: a finished run rerun with another export_dtype, a setting free to change, kept its old export
    # while config.json recorded the new one; markers from before it was stored were written in param_dtype)
    marker = {"exports": sorted(exports), "dtype": cfg.export_dtype or model.config.param_dtype}
    done = is_primary() and exported.exists() and \
        {"dtype": model.config.param_dtype, **json.loads(exported.read_text())} == marker
    if cfg.export_hf and not from_process_0(np.asarray(done)):
        gen = _export_generation_config(cfg, model)
        # Ctrl-C during an export (minutes at 7B) lets it finish and stops before the next one; it was a raw
        # KeyboardInterrupt traceback (review, session 29). After the last one the run finishes: its work is done.
        with stop.installed():
            for i, (name, params) in enumerate(exports.items()):
                if i and stop.check():
                    return _interrupted(finish_log, "export")
                params = to_host(params)  # a collective on multi-process meshes: every process takes part
                if is_primary():
                    save_hf(out / "hf" / name, params, model.config, model.hf_config, model.tokenizer,
                            dtype=cfg.export_dtype, generation_config=gen)
        if is_primary():  # after its exports: another process's marker could outrun them on a shared directory
            _write_json(exported, marker)
    finish_log()
    if is_primary():  # before the summary: summary.json, written last, says the run is done
        report.plot_run(out, selection_metric(cfg))
    return report.write_summary(out, cfg, _load_evals(out), wall_seconds=time.time() - t_start,
                                write=is_primary(), data_stats=split_stats(data), compilation=compiles.summary(),
                                best_iteration=best_it)
