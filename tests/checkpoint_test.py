"""Checkpointing: round trips (1 and 8 devices), retention, fallback, partial restore, exact resume."""
import json
import logging
import os
import pathlib
import random
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reftjax import sharding
from reftjax.checkpoint import CheckpointConfig, Checkpointer, abstract_like, restore_params
from reftjax.models import ModelConfig, init_params, init_value_head
from reftjax.steps import OptimConfig, init_state, make_optimizer

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  eos_token_ids=(1,))
TX = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0), 10)
VALUE_HEAD_SHAPES = jax.eval_shape(lambda: init_value_head(CFG, jax.random.key(0)))
DRIVER = pathlib.Path(__file__).with_name("resume_driver.py")


def _host_params(seed):
    """Random params of the model's shapes (cheaper than running the initialisers)."""
    rs = np.random.RandomState(seed)
    shapes = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    return jax.tree.map(lambda s: rs.standard_normal(s.shape).astype(s.dtype), shapes)


def _state(seed=0, mesh=None):
    rs = np.random.RandomState(seed + 1)
    params = {"policy": sharding.place_params(_host_params(seed), CFG, mesh),
              "value_head": jax.tree.map(lambda s: jnp.asarray(rs.standard_normal(s.shape).astype(s.dtype)),
                                         VALUE_HEAD_SHAPES)}
    if mesh is not None:
        params["value_head"] = sharding.put(params["value_head"],
                                            jax.tree.map(lambda _: sharding.replicated(mesh), params["value_head"]))
    st = init_state(params, TX, jax.random.key(seed + 2))
    # Make the optimizer moments non-trivial so the round trip checks real values.
    return st.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x + 3, st.opt_state),
                      step=st.step + 7)


def _assert_equal_trees(a, b, check_sharding=True):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
        if check_sharding:
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), jax.tree_util.keystr(path)


@pytest.mark.parametrize("n_devices", [1, 8])
def test_round_trip_restores_bitwise_onto_target_sharding(tmp_path, n_devices):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4)) if n_devices == 8 else None
    st = _state(mesh=mesh)
    ck = Checkpointer(CheckpointConfig(str(tmp_path)), config={"lr": 1e-2})
    assert ck.restore_latest(abstract_like(st)) is None
    assert ck.save(3, st, {"data_pos": 12, "round": 2})
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path)))
    out_state, extras, step = ck.restore_latest(abstract_like(st))
    assert (step, extras) == (3, {"data_pos": 12, "round": 2})
    _assert_equal_trees(out_state, st)
    if mesh is not None:  # really sharded, not replicated
        emb = out_state.params["policy"]["embed_tokens"]["embedding"]
        assert len({str(s.index) for s in emb.addressable_shards}) > 1
    assert (tmp_path / "3" / "config").is_dir()
    ck.close()


def test_leaving_the_with_block_by_an_exception_finishes_the_save_in_progress(tmp_path):
    """An exception (a second Ctrl-C) out of a phase left its async save writing behind the caller (session 29's
    list): the manager is a context manager now, and leaving it waits for the save and closes (once)."""
    st = _state()
    with pytest.raises(KeyboardInterrupt):
        with Checkpointer(CheckpointConfig(str(tmp_path))) as ck:
            assert ck.save(4, st, {"round": 1})
            raise KeyboardInterrupt
    assert ck._closed  # closed: the background save was waited on
    ck.close()  # a second close does nothing
    assert ck.all_steps() == [4]  # (and the directory is still read: steps_test calls all_steps after close)
    for write in (lambda: ck.save(5, st), lambda: ck.keep_only(4), ck.wait):  # writes refuse: save said True,
        with pytest.raises(RuntimeError, match="is closed"):  # then failed in the background (regression review)
            write()
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".")] == ["4"]
    assert [int(n) for n in os.listdir(tmp_path) if n.isdigit()] == [4]
    with Checkpointer(CheckpointConfig(str(tmp_path))) as ck:
        _, extras, step = ck.restore_latest(abstract_like(st))
    assert (step, extras) == (4, {"round": 1})


def test_restore_onto_a_different_mesh(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    st = _state(mesh=mesh)
    ck = Checkpointer(CheckpointConfig(str(tmp_path)))
    ck.save(1, st)
    ck.wait()
    target = _state(seed=5)  # single device, different values
    out, _, _ = ck.restore_latest(abstract_like(target))
    _assert_equal_trees(out, st, check_sharding=False)
    assert all(x.sharding.is_equivalent_to(t.sharding, x.ndim)
               for x, t in zip(jax.tree.leaves(out.params), jax.tree.leaves(target.params)))
    ck.close()


def test_keeps_last_k_plus_best(tmp_path):
    st = _state()
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=2, keep_best=1, best_metric="acc"))
    metrics = {2: 0.9, 4: 0.3, 6: 0.5}
    for s in range(1, 8):
        assert ck.save(s, st, {"s": s}, metric=metrics.get(s))
    ck.wait()
    assert ck.all_steps() == [2, 6, 7] and ck.best_step() == 2
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=2, keep_best=1, best_metric="acc"))
    for s in (8, 9):  # the best survives a restart (metrics are persisted)
        ck.save(s, st)
    ck.wait()
    assert ck.all_steps() == [2, 8, 9] and ck.best_step() == 2
    assert sorted(os.listdir(tmp_path)) == ["2", "8", "9"]
    ck.close()


def test_abstract_like_gives_the_layout_placing_the_leaves_gives():
    """NumPy arrays and scalars and Python numbers too (a Python scalar failed: no `.dtype`; session 32's list)."""
    tree = {"a": jnp.ones((2, 3), jnp.bfloat16), "b": np.zeros(4), "c": np.int64(3), "d": 2, "e": 0.5, "f": True}
    got = abstract_like(tree)
    want = jax.tree.map(jnp.asarray, tree)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), got) == jax.tree.map(lambda x: (x.shape, x.dtype), want)
    assert got["a"].sharding == tree["a"].sharding and got["d"].sharding is None


def test_best_of_tied_steps_is_the_earliest_and_keep_best_0_has_none(tmp_path):
    """Of tied steps the earliest is kept and read back, as the RL loop's strict `>` (its early stopping and the
    summary's best iteration) counts; Orbax alone kept the later (session 32's list). Also after a restart."""
    st = _state()
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "tie"), keep_last=2, keep_best=1, best_metric="acc"))
    for s, acc in ((1, 0.5), (2, 0.5), (3, 0.25), (4, 0.25)):
        ck.save(s, _state(seed=s), metric=acc)
    ck.wait()
    assert ck.all_steps() == [1, 3, 4] and ck.best_step() == 1  # kept and reported alike
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "tie"), keep_last=2, keep_best=1, best_metric="acc"))
    params, step = ck.restore_best_params(jax.tree.map(jnp.zeros_like, st.params["policy"]))
    assert (ck.best_step(), step) == (1, 1)
    jax.tree.map(np.testing.assert_array_equal, params, _state(seed=1).params["policy"])
    ck.save(5, st, metric=0.5)  # a later tie does not displace it
    ck.wait()
    assert ck.all_steps() == [1, 4, 5] and ck.best_step() == 1
    ck.close()
    # steps saved before the step was stored beside the metric (their metrics files rewritten as they were): of two
    # tied ones kept (keep_best=2), the earlier is still the best (the regression review's case)
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "old"), keep_last=1, keep_best=2, best_metric="acc"))
    for s, acc in ((1, 0.5), (2, 0.5), (3, 0.1)):
        ck.save(s, _state(seed=s), metric=acc)
    ck.close()
    for s in (1, 2):
        (tmp_path / "old" / str(s) / "metrics" / "metrics").write_text(json.dumps({"acc": 0.5}))
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "old"), keep_last=1, keep_best=2, best_metric="acc"))
    assert ck.all_steps() == [1, 2, 3] and ck.best_step() == 1
    assert ck.restore_best_params(jax.tree.map(jnp.zeros_like, st.params["policy"]))[1] == 1
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "none"), keep_last=2, keep_best=0, best_metric="acc"))
    for s, acc in ((1, 0.9), (2, 0.1), (3, 0.2)):
        ck.save(s, st, metric=acc)
    ck.wait()
    assert ck.all_steps() == [2, 3] and ck.best_step() is None  # not "the best of the last two"
    ck.close()


def test_a_nan_metric_ranks_below_every_real_one(tmp_path):
    """NaN compared false with everything: Orbax kept, and `best_step` picked, a NaN step arbitrarily (session 33's
    list). It ranks last for keeping and is never the best; a phase with only NaN figures has no best."""
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "mixed"), keep_last=1, keep_best=1, best_metric="acc"))
    for s, acc in ((1, 0.25), (2, float("nan")), (3, 0.0), (4, float("nan")), (5, float("nan"))):
        ck.save(s, _state(seed=s), metric=acc)
        ck.wait()
        assert ck.best_step() == 1
    assert ck.all_steps() == [1, 5]
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "mixed"), keep_last=1, keep_best=1, best_metric="acc"))
    assert ck.best_step() == 1 and ck.restore_best_params(abstract_like(_state().params["policy"]))[1] == 1
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "nan"), keep_last=1, keep_best=1, best_metric="acc"))
    for s in (1, 2):
        ck.save(s, _state(seed=s), metric=float("nan"))
    ck.wait()
    assert ck.best_step() is None and ck.restore_best_params(abstract_like(_state().params["policy"])) == (None, None)
    ck.close()
    # a NaN floor is none, as a NaN metric is none (it excluded every step); and the reads still work after close
    # (the wait for pending saves, new in session 34, refused on a closed checkpointer: second review)
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "mixed"), keep_last=1, keep_best=1, best_metric="acc"))
    ck.close()
    assert ck.best_step() == 1
    assert ck.restore_best_params(abstract_like(_state().params["policy"]), above=float("nan"))[1] == 1


def test_keep_only_leaves_a_finished_phase_its_last_step(tmp_path, caplog):
    """A finished SFT/verifier phase keeps only the step its marker names (the others held full training states:
    ~84 GB each at 7B in float32); a step that was never saved deletes nothing."""
    st = _state()
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=3))
    for s in (1, 2, 3):
        ck.save(s, st, {"s": s})
    with caplog.at_level(logging.WARNING, logger="reftjax.checkpoint"):
        ck.keep_only(4)
    assert ck.all_steps() == [1, 2, 3] and "step 4 is not in" in caplog.text
    ck.keep_only(3)
    assert ck.all_steps() == [3] and sorted(os.listdir(tmp_path)) == ["3"]
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=3))  # a rerun finds it and resumes from it
    _, extras, step = ck.restore_latest(_state(seed=1))
    assert (step, extras) == (3, {"s": 3})
    ck.close()


def test_an_unreadable_best_step_falls_back_to_the_next_best(tmp_path, caplog):
    """A kept best step damaged on disk failed the run at its very end (restoring the best policy for the export
    and the test evaluation); it is skipped with a warning for the next best readable step."""
    states = {s: _state(seed=s) for s in (1, 2, 3)}
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=1, keep_best=2, best_metric="acc"))
    for s, acc in ((1, 0.5), (2, 0.75), (3, 0.25)):
        ck.save(s, states[s], metric=acc)
    ck.wait()
    abstract = abstract_like(states[1].params["policy"])
    params, step = ck.restore_best_params(abstract)
    assert step == 2 and step == ck.best_step()
    _assert_equal_trees(params, states[2].params["policy"])
    victim = max((p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    with caplog.at_level(logging.WARNING, logger="reftjax.checkpoint"):
        params, step = ck.restore_best_params(abstract)
    assert step == 1 and "best step 2" in caplog.text
    _assert_equal_trees(params, states[1].params["policy"])
    # above a floor (the warm-up's validation figure: run_rl): a damaged best falls back only to steps scoring more,
    # and with none there is nothing to read (no "could not be read" error either)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reftjax.checkpoint"):
        assert ck.restore_best_params(abstract, above=0.75) == (None, None)
    assert "scores above 0.75" in caplog.text and "could be read" not in caplog.text
    assert ck.restore_best_params(abstract, above=0.4)[1] == 1  # (2 damaged, 1 above the floor)
    assert ck.restore_best_params(abstract, above=0.5) == (None, None)  # (2 damaged, 1 not above it)
    ck.close()


def test_a_damaged_metrics_file_costs_its_step_the_best_not_the_run(tmp_path, caplog):
    """Orbax reads every step's metrics when it opens a directory: one metrics file damaged on disk made the phase's
    read-back of the best fail, and every later run of the phase fail to open its checkpoints (a JSONDecodeError)
    before it could resume. During the run the step is no best candidate; at the next opening its metrics are set
    aside and written again from the copy in the step's metadata."""
    states = {s: _state(seed=s) for s in (1, 2, 3)}
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=1, keep_best=2, best_metric="acc"))
    for s, acc in ((1, 0.5), (2, 0.75), (3, 0.1)):
        ck.save(s, states[s], metric=acc)
    ck.wait()
    (tmp_path / "2" / "metrics" / "metrics").write_text('{"acc": 0.7')  # cut short
    abstract = abstract_like(states[1].params["policy"])
    with caplog.at_level(logging.WARNING, logger="reftjax.checkpoint"):
        assert ck.best_step() == 1 and ck.restore_best_params(abstract)[1] == 1  # during the run
        # later saves of the run: Orbax's preservation ranks from the metrics it holds in memory (read at opening,
        # kept at each save), never the damaged file (session 33's list: not checked then)
        ck.save(4, states[3], metric=0.6)
        ck.wait()
        assert ck.all_steps() == [2, 4] and ck.best_step() == 4
        ck.close()
        ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=1, keep_best=2, best_metric="acc"))  # a rerun
    assert "step 2" in caplog.text and "unreadable metrics" in caplog.text and "moved to" in caplog.text
    # written again from the copy in the step's metadata: the best again, as the run's own records say (without it
    # the step was no best candidate, and a save deleted it once it was not among the last: regression review)
    assert "written again from the step's metadata" in caplog.text
    assert json.loads((tmp_path / "2" / "metrics" / "metrics").read_text()) == {"acc": 0.75, "step": 2}
    assert ck.all_steps() == [2, 4] and ck.best_step() == 2 and ck.restore_latest(abstract_like(states[1]))[2] == 4
    _assert_equal_trees(ck.restore_best_params(abstract)[0], states[2].params["policy"])
    assert os.listdir(tmp_path / "unreadable") == ["2.metrics.0"]
    ck.save(5, states[1], metric=0.7)
    ck.wait()
    assert ck.all_steps() == [2, 5] and ck.best_step() == 2
    ck.close()
    # a step saved without the copy (before session 34), or with its metadata damaged too: no metric, as before
    (tmp_path / "2" / "metrics" / "metrics").write_text("{")
    meta = json.loads((tmp_path / "2" / "_CHECKPOINT_METADATA").read_text())
    (tmp_path / "2" / "_CHECKPOINT_METADATA").write_text(json.dumps({**meta, "custom_metadata": {}}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reftjax.checkpoint"):
        ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=1, keep_best=2, best_metric="acc"))
    assert "no copy in the step's metadata" in caplog.text and ck.best_step() == 5
    ck.close()
    # a mend cut short by a crash (the damaged file moved aside, the copy not yet written): mended at the next opening
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "cut"), keep_last=1, keep_best=1, best_metric="acc"))
    for s, acc in ((1, 0.9), (2, 0.1)):
        ck.save(s, states[s], metric=acc)
    ck.close()
    os.replace(tmp_path / "cut" / "1" / "metrics", tmp_path / "1.metrics")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reftjax.checkpoint"):
        ck = Checkpointer(CheckpointConfig(str(tmp_path / "cut"), keep_last=1, keep_best=1, best_metric="acc"))
    assert "step 1" in caplog.text and "no metrics file; written again" in caplog.text
    ck.save(3, states[3], metric=0.5)
    ck.wait()
    assert ck.all_steps() == [1, 3] and ck.best_step() == 1
    ck.close()
    # the mend's own write cut short (a full disk): written beside the file and renamed, so no half-written metrics
    # file is left for the next opening to set aside again (mutation review, session 56, M30: untested till now)
    os.replace(tmp_path / "cut" / "1" / "metrics", tmp_path / "1.metrics.again")

    def cut_short(obj, f, **kw):
        f.write(json.dumps(obj)[:6])
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp, pytest.raises(OSError, match="No space left"):
        mp.setattr(json, "dump", cut_short)
        Checkpointer(CheckpointConfig(str(tmp_path / "cut"), keep_last=1, keep_best=1, best_metric="acc"))
    assert not (tmp_path / "cut" / "1" / "metrics" / "metrics").exists()
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "cut"), keep_last=1, keep_best=1, best_metric="acc"))
    assert json.loads((tmp_path / "cut" / "1" / "metrics" / "metrics").read_text()) == {"acc": 0.9, "step": 1}
    assert ck.best_step() == 1 and not os.path.exists(tmp_path / "cut" / "unreadable")
    ck.close()


def test_two_processes_fall_back_together_from_a_step_one_of_them_cannot_read(tmp_path, two_processes):
    """2 JAX processes x 1 CPU device (tests/checkpoint_two_process_driver.py), step 5 damaged only in the shards
    process 1 reads. Each process fell back alone (regression review, session 34): the best policy held step 5's
    shards on one process and step 3's on the other, and a resume hung (the process that fell back waited at the
    set-aside barrier; the one that kept step 5 never came, having left Orbax's restore barrier unmatched). Process 1
    also fails to read step 3's metrics: each process ranked the candidates alone, so it gave up after step 5 while
    process 0 waited in step 3's restore (second review)."""
    outs = two_processes([pathlib.Path(__file__).with_name("checkpoint_two_process_driver.py"), tmp_path / "ckpt"])
    seen = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert seen[0] == seen[1], seen
    assert seen[0] == {"clean_best": [5, [5]], "best": [3, [3]], "latest": [3, [3], {"s": 3}]}
    assert "unreadable on another process" in (tmp_path / "p0.err").read_text()
    assert os.listdir(tmp_path / "ckpt" / "unreadable") == ["5.0"]


def test_save_every_and_nonfinite_guard(tmp_path, caplog):
    st = _state()
    ck = Checkpointer(CheckpointConfig(str(tmp_path), save_every=2))
    assert not ck.save(1, st) and ck.save(2, st) and not ck.save(2, st)
    bad = st.replace(params={**st.params, "value_head": jax.tree.map(lambda x: x.at[0].set(jnp.nan),
                                                                     st.params["value_head"])})
    with caplog.at_level(logging.WARNING):
        assert ck.save(6, st)  # no metric, on purpose: Orbax's warning about it is filtered out
        assert not ck.save(4, bad)
        assert not ck.save(5, st.replace(params=jax.tree.map(lambda x: x * jnp.inf, st.params)), force=True)
    assert "NaN/Inf" in caplog.text and "did not provide metrics" not in caplog.text
    ck.wait()
    assert ck.all_steps() == [2, 6]
    ck.close()


@pytest.mark.parametrize("damage", ["marker", "file", "tmpdir", "metadata"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage):
    st1, st2 = _state(seed=0), _state(seed=10)
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=3))
    ck.save(1, st1, {"pos": 1})
    ck.save(2, st2, {"pos": 2})
    ck.close()
    latest = tmp_path / "2"
    if damage == "marker":
        (latest / "commit_success.txt").unlink()
    elif damage == "file":
        victim = max((p for p in (latest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    elif damage == "metadata":  # the state's tree metadata cut short (mutation review, session 56)
        (latest / "state" / "_METADATA").write_text("{")
    else:  # a save killed mid-write leaves only Orbax's temporary directory
        latest.rename(tmp_path / "2.orbax-checkpoint-tmp-123")
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=3))
    with caplog.at_level(logging.WARNING, logger="reftjax.checkpoint"):
        state, extras, step = ck.restore_latest(abstract_like(st1))
    assert (step, extras) == (1, {"pos": 1})
    _assert_equal_trees(state, st1)
    assert not (tmp_path / "2.orbax-checkpoint-tmp-123").exists()  # (removed: session 56)
    if damage != "tmpdir":
        assert "step 2" in caplog.text
        # set aside (kept for inspection), so the resumed run can save step 2 again and the next resume reads it
        assert not latest.exists() and (tmp_path / "unreadable" / "2.0").is_dir()
    st3 = _state(seed=20)
    assert ck.save(2, st3, {"pos": 3})
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=3))
    state, extras, step = ck.restore_latest(abstract_like(st1))
    assert (step, extras) == (2, {"pos": 3})
    _assert_equal_trees(state, st3)
    ck.close()


def test_all_corrupt_raises(tmp_path):
    st = _state()
    ck = Checkpointer(CheckpointConfig(str(tmp_path)))
    ck.save(1, st)
    ck.close()
    (tmp_path / "1" / "commit_success.txt").unlink()
    with pytest.raises(RuntimeError, match="none of the checkpoints"):
        Checkpointer(CheckpointConfig(str(tmp_path))).restore_latest(abstract_like(st))


def test_only_a_critic_trunks_head_at_the_params_root_or_in_its_moments_is_obsolete():
    """`obsolete_leaves` drops the separate critic's old lm_head (params and its AdamW moments), not a subtree of
    the same names deeper in the params, which stays a layout mismatch (helper review, session 41)."""
    from reftjax.checkpoint import layout_mismatch, obsolete_leaves

    leaf = jax.ShapeDtypeStruct((2,), jnp.float32)
    head = {"lm_head": {"kernel": leaf}}
    wanted = {"params": {"policy": {"x": leaf}, "critic": {"b": leaf}},
              "opt_state": [{"mu": {"policy": {"x": leaf}, "critic": {"b": leaf}}}]}
    stored = {"params": {"policy": {"x": leaf, "critic": head}, "critic": {"b": leaf, **head}},
              "opt_state": [{"mu": {"policy": {"x": leaf, "critic": head}, "critic": {"b": leaf, **head}}}]}
    assert ["/".join(map(str, k)) for k in obsolete_leaves(stored, wanted)] == [
        "params/critic/lm_head/kernel", "opt_state/0/mu/critic/lm_head/kernel"]
    assert layout_mismatch(stored, wanted) == ("only in the checkpoint: params/policy/critic/lm_head/kernel, "
                                               "opt_state/0/mu/policy/critic/lm_head/kernel")


def test_different_layout_is_an_error_not_a_fallback(tmp_path):
    """A checkpoint of another optimizer layout or model shape names the step and the difference,
    instead of being skipped as damaged (every older step of the run would not fit either)."""
    st = _state()
    ck = Checkpointer(CheckpointConfig(str(tmp_path)))
    ck.save(1, st)
    ck.save(2, st)
    ck.close()
    tx_sep = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0), 10,
                            separate_critic_state=True)
    other_opt = init_state(st.params, tx_sep, jax.random.key(0))
    ck = Checkpointer(CheckpointConfig(str(tmp_path)))
    with pytest.raises(ValueError, match=r"/2: this checkpoint holds a different training state.*opt_state"):
        ck.restore_latest(abstract_like(other_opt))
    wider = {"policy": jax.tree.map(lambda x: jnp.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype)
                                    if x.ndim == 2 else x, st.params["policy"]),
             "value_head": st.params["value_head"]}
    with pytest.raises(ValueError, match=r"shape differs: params/policy/.* stored vs"):
        ck.restore_latest(abstract_like(init_state(wider, TX, jax.random.key(0))))
    state, _, step = ck.restore_latest(abstract_like(st))  # the right layout still restores
    assert step == 2
    _assert_equal_trees(state, st)
    ck.close()


def test_partial_restore_of_policy_params(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    st = _state(seed=3)
    ck = Checkpointer(CheckpointConfig(str(tmp_path)))
    ck.save(5, st)
    ck.save(6, _state(seed=4))
    ck.wait()
    target = abstract_like(sharding.place_params(_host_params(9), CFG, mesh))
    for src in (5, str(tmp_path / "5")):
        policy = ck.restore_params(src, target)
        assert jax.tree.structure(policy) == jax.tree.structure(st.params["policy"])  # no value head, no opt
        _assert_equal_trees(policy, st.params["policy"], check_sharding=False)
        assert all(x.sharding.is_equivalent_to(t.sharding, x.ndim)
                   for x, t in zip(jax.tree.leaves(policy), jax.tree.leaves(target)))
    latest = restore_params(tmp_path, target)  # run directory: its latest step
    _assert_equal_trees(latest, _state(seed=4).params["policy"], check_sharding=False)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nothing'}: no committed checkpoint")):
        restore_params(tmp_path / "nothing", target)
    ck.close()


def test_config_validation():
    with pytest.raises(ValueError):
        CheckpointConfig("")
    with pytest.raises(ValueError):
        CheckpointConfig("/tmp/x", keep_last=0)
    # (neither was tested: keep_best=-1 reached Orbax as BestN(-1), save_every=0 a ZeroDivisionError at the first
    # save; mutation review, session 44)
    for bad in ({"keep_best": -1}, {"save_every": 0}):
        with pytest.raises(ValueError):
            CheckpointConfig("/tmp/x", **bad)
    CheckpointConfig("/tmp/x", keep_best=0, save_every=1)  # (the bounds themselves are allowed)


def _driver(tmp_path, run_dir, out, kill=""):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cmd = [sys.executable, str(DRIVER), "--dir", str(run_dir), "--out", str(out)] + (["--kill", kill] if kill else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.heavy
def test_exact_resume_after_sigkill(tmp_path):
    """Acceptance: SIGKILL mid-SFT and during a PPO save, rerun: final state bitwise equal to a straight run."""
    straight = _driver(tmp_path, tmp_path / "a", tmp_path / "a.npz")
    assert straight.returncode == 0, straight.stderr[-3000:]
    rnd = random.Random(0)
    kills = [f"sft:{rnd.randint(1, 3)}:step", f"ppo:{rnd.randint(1, 3)}:save"]
    for kill in kills:
        r = _driver(tmp_path, tmp_path / "b", tmp_path / "b.npz", kill)
        assert r.returncode == -9, (kill, r.returncode, r.stderr[-3000:])
    assert not (tmp_path / "b.npz").exists()
    r = _driver(tmp_path, tmp_path / "b", tmp_path / "b.npz")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a.files == b.files and len(a.files) > 10
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k


def test_a_restored_state_runs_the_compiled_step_without_a_mesh(tmp_path):
    """Without a mesh, a fresh state's leaves were uncommitted and a restored state's committed to their device: the
    same-shape step compiled a second program after every resume (helper review: once per jitted step)."""
    from reftjax.data.tokenize import TokenizeConfig, TokenizedDataset, collate_sft
    from reftjax.steps import make_sft_step

    params = {"policy": jax.tree.map(jnp.asarray, _host_params(0))}
    n = 4
    ds = TokenizedDataset([np.full(5, 3 + i, np.int32) for i in range(n)], [np.zeros(0, np.int32)] * n,
                          [np.full(4, 7 + i, np.int32) for i in range(n)], np.arange(n), 0,
                          TokenizeConfig(max_prompt_len=8, max_target_len=8, min_bucket=16), {})
    batch = collate_sft(ds, np.arange(n), n)
    step = make_sft_step(CFG, TX)
    template = init_state(jax.tree.map(jnp.copy, params), TX, jax.random.key(0))
    st = init_state(params, TX, jax.random.key(0))
    st, _ = step(st, batch)  # (donates the state: params are gone)
    ck = Checkpointer(CheckpointConfig(str(tmp_path), async_save=False))
    ck.save(1, st)
    restored, _, _ = ck.restore_latest(template)
    ck.close()
    before = step._cache_size()
    step(restored, batch)
    assert step._cache_size() == before == 1


def test_forced_saves_uncommitted_steps_repeated_set_asides_and_keeping_one_step(tmp_path):
    """A forced save off the `save_every` grid is written; `latest_step`, `all_steps` and `restore_params` of the
    run directory see only committed steps; a step number set aside twice keeps both copies (`unreadable/2.0`,
    `2.1`); `keep_only` deletes the later steps too (mutation review, session 46)."""
    states = {s: _state(seed=s) for s in (1, 2, 3)}
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "a"), save_every=2, keep_last=5))
    assert ck.save(2, states[2]) and ck.save(3, states[3], force=True) and not ck.save(5, states[3])
    ck.wait()
    assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
    (tmp_path / "a" / "3" / "commit_success.txt").unlink()
    assert ck.all_steps() == [2] and ck.latest_step() == 2
    target = abstract_like(states[1].params["policy"])
    _assert_equal_trees(restore_params(tmp_path / "a", target), states[2].params["policy"], check_sharding=False)
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "b"), keep_last=5))
    ck.save(1, states[1], {"s": 1})
    for _ in range(2):
        ck.save(2, states[2], {"s": 2})
        ck.wait()
        (tmp_path / "b" / "2" / "commit_success.txt").unlink()
        _, extras, step = ck.restore_latest(abstract_like(states[1]))
        assert (step, extras) == (1, {"s": 1}) and ck.all_steps() == [1]  # (the restored step stays)
    assert sorted(os.listdir(tmp_path / "b" / "unreadable")) == ["2.0", "2.1"]
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "c"), keep_last=5))
    for s in (1, 2, 3):
        ck.save(s, states[s])
    ck.keep_only(2)
    assert ck.all_steps() == [2] and sorted(os.listdir(tmp_path / "c")) == ["2"]
    ck.close()


def test_a_step_stores_the_config_and_a_zero_metric_and_no_best_without_keep_best(tmp_path):
    """The experiment config is written with every step (only its folder was checked); a metric of 0.0 is a metric
    (the tiny runs' validation accuracy: an `if not metric` made such a step no best candidate, deleted at the next
    save); with `keep_best=0` there is no best policy to read back either (mutation review, session 56)."""
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "zero"), keep_last=1, keep_best=1, best_metric="acc"),
                      config={"lr": 0.01, "model": {"layers": 1}})
    for s, acc in ((1, 0.0), (2, None), (3, None)):
        assert ck.save(s, _state(seed=s), metric=acc)
    ck.wait()
    assert ck.all_steps() == [1, 3] and ck.best_step() == 1
    assert json.loads((tmp_path / "zero" / "1" / "metrics" / "metrics").read_text()) == {"acc": 0.0, "step": 1}
    for s in (1, 3):
        assert json.loads((tmp_path / "zero" / str(s) / "config" / "metadata").read_text()) == {
            "lr": 0.01, "model": {"layers": 1}}
    ck.close()
    ck = Checkpointer(CheckpointConfig(str(tmp_path / "none"), keep_last=2, keep_best=0, best_metric="acc"))
    for s, acc in ((1, 0.9), (2, 0.1)):
        ck.save(s, _state(seed=s), metric=acc)
    assert ck.restore_best_params(abstract_like(_state().params["policy"])) == (None, None)
    ck.close()


def test_the_best_counts_a_save_in_progress_and_never_an_uncommitted_step(tmp_path):
    """`best_step` and `restore_best_params` right after an async save see it (they wait for it); a step without its
    commit marker is no best candidate, whatever its metrics file says, nor the step `keep_only` keeps alone (mutation
    review, session 56)."""
    states = {s: _state(seed=s) for s in (1, 2, 3)}
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=3, keep_best=1, best_metric="acc"))
    ck.save(1, states[1], metric=0.5)
    ck.wait()
    assert ck.save(2, states[2], metric=0.75)
    assert ck.best_step() == 2  # (no wait in between: the save was still being written)
    ck.save(3, states[3], metric=0.9)
    ck.wait()
    (tmp_path / "3" / "commit_success.txt").unlink()
    params, step = ck.restore_best_params(abstract_like(states[1].params["policy"]))
    assert ck.best_step() == step == 2
    _assert_equal_trees(params, states[2].params["policy"])
    ck.keep_only(3)  # (an uncommitted step is not one to keep alone: nothing deleted)
    assert ck.all_steps() == [1, 2] and {"1", "2", "3"} <= set(os.listdir(tmp_path))
    ck.close()


def test_restore_params_reads_the_named_subtree_of_the_newest_step(tmp_path):
    """`key` picks the params subtree (the verifier phase's `verifier`); a run directory's newest step is the highest
    number (9 < 10), not the last name in string order (mutation review, session 56)."""
    verifier = {"head": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
    ck = Checkpointer(CheckpointConfig(str(tmp_path), keep_last=3))
    for s in (10, 9):  # (a step below the newest is saved too: `save` refuses only what its docstring says)
        params = {"policy": _state(seed=s).params["policy"], "verifier": jax.tree.map(lambda x: x + s, verifier)}
        assert ck.save(s, init_state(params, TX, jax.random.key(s)))
    ck.close()
    got = restore_params(tmp_path, abstract_like(verifier), key="verifier")
    np.testing.assert_array_equal(got["head"]["kernel"], np.arange(6.0).reshape(2, 3) + 10)
    _assert_equal_trees(restore_params(tmp_path / "9", abstract_like(_state().params["policy"])),
                        _state(seed=9).params["policy"], check_sharding=False)


def test_layout_mismatch_names_the_stored_and_the_wanted_shapes():
    """The message says which shape the checkpoint holds and which this run builds, and counts what it leaves out
    only past `limit` (mutation review, session 56)."""
    from reftjax.checkpoint import layout_mismatch

    def leaf(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    stored = {"params": {"a": leaf(2), "b": leaf(3), "c": leaf(4)}}
    wanted = {"params": {"a": leaf(5), "b": leaf(3), "c": leaf(4), "d": leaf(1), "e": leaf(1), "f": leaf(1)}}
    assert layout_mismatch(stored, wanted) == ("not in the checkpoint: params/d, params/e, params/f; "
                                               "shape differs: params/a (2,) stored vs (5,) here")
    wanted["params"]["g"] = leaf(1)
    assert layout_mismatch(stored, wanted, limit=2).startswith("not in the checkpoint: params/d, params/e and 2 more;")


def test_restore_casts_to_the_target_dtypes_and_keeps_the_key_implementation(tmp_path):
    """A restore lands in the abstract state's dtypes (float32 params read as bfloat16 here), not the stored ones,
    and a typed key comes back with its own implementation (`rbg` here, not the default) (mutation review, s56)."""
    st = _state()
    st = st.replace(rng=jax.random.key(3, impl="rbg"))
    ck = Checkpointer(CheckpointConfig(str(tmp_path)))
    ck.save(1, st)
    ck.wait()
    target = abstract_like(st)
    target = target.replace(params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16,
                                                                               sharding=x.sharding), target.params))
    out, _, _ = ck.restore_latest(target)
    ck.close()
    assert {x.dtype for x in jax.tree.leaves(out.params)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y.astype(jnp.bfloat16)), out.params, st.params)
    assert out.step.dtype == st.step.dtype and int(out.step) == int(st.step)
    assert str(jax.random.key_impl(out.rng)) == str(jax.random.key_impl(st.rng))
    np.testing.assert_array_equal(jax.random.key_data(out.rng), jax.random.key_data(st.rng))
