"""reftjax.metrics: the measured matmul peak that every MFU figure divides by; the metrics log after a resume."""
import jax
import pytest

from reftjax import metrics


@pytest.fixture
def fresh_peak(monkeypatch):
    monkeypatch.setattr(metrics, "_PEAK_CACHE", {})
    calls = []

    def fake_min_seconds(fn, repeats):
        fn()  # the real jitted product runs (and must run) once
        calls.append(repeats)
        return 0.5

    monkeypatch.setattr(metrics, "min_seconds", fake_min_seconds)
    return calls


def test_peak_is_the_fastest_product_rate_times_processes_on_cpu_and_is_measured_once(fresh_peak):
    # the suite's 8 CPU devices share the host's cores: x device_count read MFU 8x low (session 20's left-alone list)
    assert jax.device_count() > 1 and jax.devices()[0].platform == "cpu"
    peak = metrics.measured_peak_flops(n=64, repeats=4)
    assert peak == 2 * 64 ** 3 / 0.5 * jax.process_count()
    assert fresh_peak == [4]
    assert metrics.measured_peak_flops(n=128) == peak and fresh_peak == [4]  # cached per platform and dtype
    # a bf16 model's MFU is against the bf16 rate (f32 at default precision is TF32 on NVIDIA GPUs: ~half of it)
    assert metrics.measured_peak_flops(n=32, repeats=2, dtype="bfloat16") == 2 * 32 ** 3 / 0.5 * jax.process_count()
    assert fresh_peak == [4, 2] and metrics.measured_peak_flops(dtype="bfloat16") == 2 * 32 ** 3 / 0.5


def test_cpu_peak_defaults_to_a_2048_product(fresh_peak):
    # a 1024^3 product timed 3 times measured 79 GFLOP/s on a 115 GFLOP/s host (MFU 1.015, BUILD_NOTES session 16)
    assert jax.devices()[0].platform == "cpu"
    assert metrics.measured_peak_flops() == 2 * 2048 ** 3 / 0.5
    assert fresh_peak == [5]


def test_mfu_is_model_flops_rate_over_peak():
    assert metrics.mfu(tokens=1000, seconds=2.0, flops_per_token=1e6, peak=1e9) == pytest.approx(0.5)


def test_rewind_drops_the_steps_a_resumed_phase_redoes(tmp_path):
    from reftjax.metrics import MetricsLogger, read_metrics

    log = MetricsLogger(tmp_path, tensorboard=False, enabled=True)
    for phase, step in (("sft", 0), ("sft", 1), ("rl", 1), ("val", 1), ("rl", 2), ("val", 2), ("rl", 3)):
        log.log(phase, step, {"x": float(step)})
    log._jsonl.write('{"phase": "rl", "st')  # a line cut by the kill
    assert log.rewind({"rl": 1, "val": 1}) == 4
    log.log("rl", 2, {"x": 20.0})  # appends after the rewrite
    log.close()
    assert [(r["phase"], r["step"], r["x"]) for r in read_metrics(tmp_path)] == [
        ("sft", 0, 0.0), ("sft", 1, 1.0), ("rl", 1, 1.0), ("val", 1, 1.0), ("rl", 2, 20.0)]


def _tensorboard_scalars(logdir):
    """(tag, step, value) of every scalar in the event files under `logdir` (TFRecord framing, tensorboardX protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
            walls.extend(event.wall_time for _ in event.summary.value)
    return out


walls = []  # _tensorboard_scalars' events' wall times, in file order


def test_rewind_rewrites_tensorboard_so_a_redone_step_shows_once(tmp_path):
    """TensorBoard's event files are append-only: after a resume the redone steps showed twice there."""
    from reftjax.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=True, enabled=True)
    for step in (1, 2, 3):
        log.log("rl", step, {"reward": float(step)})
    log.rewind({"rl": 1})
    log.log("rl", 2, {"reward": 20.0})
    log.close()
    assert sorted(_tensorboard_scalars(tmp_path / "tensorboard")) == [("rl/reward", 1, 1.0), ("rl/reward", 2, 20.0)]


def test_a_restart_restores_tensorboard_rows_a_kill_left_in_its_buffer(tmp_path):
    """A SIGKILL lost the rows TensorBoard still buffered (it flushes every ~2 min) while metrics.jsonl kept them; a
    resume that dropped no row never rebuilt the event files (helper review: a whole SFT phase missing there)."""
    import json
    import shutil

    from reftjax.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=True, enabled=True)
    for step in range(3):
        log.log("sft", step, {"loss": float(step)})
    log._jsonl.close()  # the process dies: nothing flushed to the event files, the JSONL lines are in
    shutil.rmtree(tmp_path / "tensorboard")
    log = MetricsLogger(tmp_path, tensorboard=True, enabled=True)  # the rerun
    assert log.rewind({"sft": 2}) == 0  # its checkpoint covers every logged step: nothing dropped
    log.rewind({"rl": 0})  # a later phase start in the same process does not rebuild again
    log.log("rl", 1, {"reward": 0.5})
    log.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert sorted(_tensorboard_scalars(tmp_path / "tensorboard")) == [
        ("rl/reward", 1, 0.5), ("sft/loss", 0, 0.0), ("sft/loss", 1, 1.0), ("sft/loss", 2, 2.0)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["phase"] == "rl"


def test_a_line_cut_by_a_crash_does_not_swallow_the_next_row(tmp_path):
    import json

    (tmp_path / "metrics.jsonl").write_text('{"phase": "sft", "step": 0}\n{"phase": "sft", "st')  # killed mid-write
    logger = metrics.MetricsLogger(tmp_path, tensorboard=False, enabled=True)
    logger.log("eval/val_sft", 0, {"accuracy": 0.5})
    logger.close()
    rows = []
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    assert [(r["phase"], r["step"]) for r in rows] == [("sft", 0), ("eval/val_sft", 0)]


def test_remeasuring_the_peak_keeps_the_faster_reading(monkeypatch):
    monkeypatch.setattr(metrics, "_PEAK_CACHE", {})
    times = iter([1.0, 0.5, 2.0])
    monkeypatch.setattr(metrics, "min_seconds", lambda fn, repeats: (fn(), next(times))[1])
    first = metrics.measured_peak_flops(n=64)
    assert metrics.measured_peak_flops(n=64) == first  # cached
    assert metrics.measured_peak_flops(n=64, remeasure=True) == 2 * first  # faster second reading
    assert metrics.measured_peak_flops(n=64, remeasure=True) == 2 * first  # a slower third one is ignored


def test_model_flops_counts_each_shared_prompt_once_and_the_head_on_completions_only():
    from reftjax.models import ModelConfig

    cfg = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1)
    head = 2.0 * 8 * 100
    one = metrics.model_flops(cfg, [10], [4])
    assert one == 10 * (cfg.flops_per_token(5) - head) + 4 * cfg.flops_per_token(12)
    # two rows sharing one prompt: the prompt once, both completions
    assert metrics.model_flops(cfg, [10, 10], [4, 4], group=2) == one + 4 * cfg.flops_per_token(12)


def test_flops_per_token_counts_each_matmul_a_token_meets():
    """Forward FLOPs per token: 2 x the matmul weights a token meets (q and o over H heads, k and v over K, the three
    MLP matrices, the vocabulary head) + 2 x 2 x H x hd per layer and attended key (QK^T and PV). Only ratios against
    `model_flops` were tested: K heads counted as H, the attention at half or over K heads passed (mutation review of
    models/config.py), each a wrong MFU."""
    from reftjax.models import ModelConfig

    cfg = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=6)
    block = 8 * (2 * 6) * 2 + 8 * (1 * 6) * 2 + 3 * 8 * 16  # q and o; k and v; gate, up and down
    assert block == 672 and cfg.flops_per_token() == 2 * (2 * block + 8 * 100)
    assert cfg.flops_per_token(10, head=False) == 2 * 2 * block + 2 * 2 * (2 * 2 * 6 * 10)


def test_rl_iteration_flops_counts_rollout_experience_and_update_passes():
    """The RL metrics line's MFU counted generated tokens only (no prompts, no experience or update passes) over
    the whole iteration's time: 0.17-0.23x the executed FLOPs (helper review)."""
    from reftjax.models import ModelConfig

    cfg = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1)
    p, g = [10, 10, 7, 7], [4, 6, 3, 5]  # two prompts x two samples, prompt-major
    per_row = metrics.model_flops(cfg, p, g)
    rollout = metrics.model_flops(cfg, p, g, group=2)
    assert rollout < per_row
    assert metrics.rl_iteration_flops(cfg, p, g, 2, 1, False, 2) == rollout + per_row * (2 + 6)
    assert metrics.rl_iteration_flops(cfg, p, g, 2, 2, True, 1) == rollout + rollout * (1 + 3)
    # kl_coef 0 runs no reference forward; a separate critic adds its trunk to the experience and to every update
    # (helper review: the loop's mfu read 1.21x / 0.56x the executed FLOPs for these)
    assert metrics.rl_iteration_flops(cfg, p, g, 2, 1, False, 1, reference=False) == rollout + per_row * (1 + 3)
    assert metrics.rl_iteration_flops(cfg, p, g, 2, 1, True, 1, reference=False) == rollout + per_row * 3
    # the critic's trunk runs no vocabulary head (its passes counted the policy's head: session 41)
    trunk = per_row - sum(g) * 2 * cfg.hidden_size * cfg.vocab_size
    assert metrics.model_flops(cfg, p, g, head=False) == trunk
    assert metrics.rl_iteration_flops(cfg, p, g, 2, 1, False, 2, separate_critic=True) == \
        rollout + per_row * (2 + 6) + trunk * (1 + 6)


def test_rebuilt_tensorboard_rows_keep_the_time_they_were_logged(tmp_path):
    """Rows rebuilt from metrics.jsonl at a resume got the rebuild's wall time, so TensorBoard's wall-time axis
    put a whole phase at the moment of the restart (helper review)."""
    import json

    from reftjax.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=True, enabled=True)
    for step in range(3):
        log.log("sft", step, {"loss": float(step)})
    log.close()
    logged = [json.loads(l)["time"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(dict(json.loads(l), time=1.0e9 + i)) + "\n"
                                                    for i, l in enumerate(lines)))  # logged long ago
    log = MetricsLogger(tmp_path, tensorboard=True, enabled=True)
    log.rewind({"sft": 2})  # the first rewind after a restart rebuilds the event files
    log.close()
    walls.clear()
    assert sorted(_tensorboard_scalars(tmp_path / "tensorboard")) == [("sft/loss", i, float(i)) for i in range(3)]
    assert sorted(walls) == [1.0e9, 1.0e9 + 1, 1.0e9 + 2] and len(logged) == 3


def test_a_failed_tensorboard_write_turns_tensorboard_off_and_never_blocks(tmp_path, monkeypatch, caplog):
    """tensorboardX wrote from a background thread through a 10-slot queue: one failed write (a full disk) killed the
    thread, and the next add_scalar blocked for good, SIGTERM included (helper review: a tiny pipeline hung in
    run_rl's log call). Writes are now synchronous: a failure warns, TensorBoard stops, metrics.jsonl goes on, and
    the next process rebuilds the event files from it. The run's rows are readable as soon as they are logged."""
    import json
    import threading

    from tensorboardX.event_file_writer import EventsWriter

    from reftjax.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=True, enabled=True)
    log.log("rl", 1, {"reward": 0.5, "kl": 0.0})
    walls.clear()
    assert sorted(_tensorboard_scalars(tmp_path / "tensorboard")) == [("rl/kl", 1, 0.0), ("rl/reward", 1, 0.5)]
    real, calls = EventsWriter.write_event, [0]

    def full_disk(self, event):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(28, "No space left on device")
        return real(self, event)

    monkeypatch.setattr(EventsWriter, "write_event", full_disk)
    done = threading.Event()
    worker = threading.Thread(target=lambda: ([log.log("rl", s, {"reward": 0.1 * s, "kl": 0.0}) for s in range(2, 40)],
                                              done.set()), daemon=True)
    with caplog.at_level("WARNING"):
        worker.start()
        assert done.wait(30), "logging blocked after a failed TensorBoard write"
    assert "TensorBoard write failed ([Errno 28] No space left on device)" in caplog.text
    assert calls[0] == 2  # off after the failure
    log.close()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 40))
    monkeypatch.setattr(EventsWriter, "write_event", real)
    log = MetricsLogger(tmp_path, tensorboard=True, enabled=True)  # the resume
    log.rewind({"rl": 39})
    log.close()
    walls.clear()
    assert sorted(s for s in _tensorboard_scalars(tmp_path / "tensorboard") if s[0] == "rl/reward") == \
        [("rl/reward", s, pytest.approx(0.5 if s == 1 else 0.1 * s)) for s in range(1, 40)]


def test_read_metrics_skips_a_line_cut_by_a_crash_and_reads_on(tmp_path):
    """A line a crash cut short is skipped, and the rows after it (a later invocation's) are read: stopping there
    lost them for `wall_times`, the grader-error counts and a notebook reading a killed run (mutation review,
    session 44)."""
    from reftjax.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"phase": "sft", "step": 1}\n{"phase": "sft", "st\n'
                                            '{"phase": "sft", "step": 2}\n')
    assert read_metrics(tmp_path) == [{"phase": "sft", "step": 1}, {"phase": "sft", "step": 2}]


def test_non_finite_figures_are_logged_as_null_and_non_scalars_left_out(tmp_path):
    """A NaN or infinite figure (a diverged loss) is written as JSON null: `NaN` / `Infinity` are not JSON, and a
    strict reader of metrics.jsonl (jq, JavaScript) fails on the whole line."""
    import json

    import numpy as np

    from reftjax.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False, enabled=True)
    row = logger.log("rl", 1, {"kl": float("nan"), "loss": np.float32("inf"), "reward": 0.5, "hist": np.zeros(3)})
    logger.close()
    assert row == {"kl": None, "loss": None, "reward": 0.5}

    def strict(token):
        raise ValueError(token)

    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=strict)
    assert {k: line[k] for k in ("phase", "step", "kl", "loss", "reward")} == \
        {"phase": "rl", "step": 1, "kl": None, "loss": None, "reward": 0.5} and "hist" not in line


def test_model_flops_runs_each_group_s_own_prompt_and_a_separate_critic_shares_prompts_too():
    """`group` rows share the prompt at their group's start: with prompts of different lengths the trunk runs on
    10 and 6 tokens, not twice on the first prompt's 10; a separate critic's passes share prompts as the policy's do
    (`share_prompt`), trunk only (mutation review, session 56)."""
    from reftjax.models import ModelConfig

    cfg = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1)
    head = 2.0 * 8 * 100
    p, g = [10, 10, 6, 6], [4, 6, 2, 8]  # two prompts x two samples, prompt-major
    fpt = cfg.flops_per_token
    prompts = 10 * (fpt(5) - head) + 6 * (fpt(3) - head)
    completions = 4 * fpt(12) + 6 * fpt(13) + 2 * fpt(7) + 8 * fpt(10)
    assert metrics.model_flops(cfg, p, g, group=2) == prompts + completions
    shared_trunk = prompts + completions - sum(g) * head
    assert metrics.model_flops(cfg, p, g, group=2, head=False) == shared_trunk
    assert metrics.rl_iteration_flops(cfg, p, g, 2, 2, False, 1, separate_critic=True) == \
        (prompts + completions) * (1 + 1 + 1 + 3) + shared_trunk * (1 + 3)
    assert metrics.mfu(tokens=100, seconds=0.25, flops_per_token=1e6, peak=1e9) == pytest.approx(0.4)


def test_the_logger_writes_in_process_0_by_default_and_only_returns_rows_elsewhere(tmp_path):
    """`enabled` defaults to this being JAX process 0 (the suite's one process writes); a disabled logger (another
    process) writes nothing and returns the same rows; tensorboard=False leaves no event files; a NumPy step is
    written as a JSON number; empty and multi-element arrays are left out (mutation review, session 56)."""
    import json

    import numpy as np

    from reftjax.metrics import MetricsLogger, read_metrics

    assert read_metrics(tmp_path / "none") == []
    log = MetricsLogger(tmp_path / "on", tensorboard=False)
    row = log.log("rl", np.int64(3), {"reward": np.float32(0.5), "n": 2, "empty": np.zeros(0), "hist": np.ones(2)})
    log.close()
    assert row == {"reward": 0.5, "n": 2}
    lines = (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and {k: v for k, v in json.loads(lines[0]).items() if k != "time"} == \
        {"phase": "rl", "step": 3, "reward": 0.5, "n": 2}
    assert sorted(p.name for p in (tmp_path / "on").iterdir()) == ["metrics.jsonl"]  # no tensorboard folder
    off = MetricsLogger(tmp_path / "off", enabled=False)
    assert off.log("rl", 3, {"reward": 0.5, "kl": float("nan")}) == {"reward": 0.5, "kl": None}
    assert off.rewind({"rl": 0}) == 0
    off.close()
    assert not (tmp_path / "off").exists()
