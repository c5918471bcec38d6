"""An OpenAI reinforcement fine-tuning job read as reftjax settings (`reftjax.openai_job`, `--openai-job`)."""
import json
import os

import pytest

GRADER = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
          "reference": "{{item.reference_answer}}", "operation": "eq"}


def _rows(n, start=0):
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"}],
                               "reference_answer": str(i + 1)}) + "\n" for i in range(start, start + n))


def _job(tmp_path, **changes):
    """A job file in tmp_path naming data/train.jsonl (10 rows) and data/val.jsonl (4) by relative paths."""
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "train.jsonl").write_text(_rows(10))
    (tmp_path / "data" / "val.jsonl").write_text(_rows(4, start=10))
    job = {"model": "my-org/my-model", "training_file": "data/train.jsonl", "validation_file": "data/val.jsonl",
           "seed": 7, "suffix": "rft_run", "metadata": {"team": "x"},
           "method": {"type": "reinforcement", "reinforcement": {
               "grader": GRADER,
               "hyperparameters": {"batch_size": 3, "n_epochs": 2, "learning_rate_multiplier": 0.5,
                                   "eval_interval": 2, "compute_multiplier": "auto", "eval_samples": "auto",
                                   "reasoning_effort": "default"}}}}
    for path, value in changes.items():  # "method.reinforcement.hyperparameters.batch_size": 0
        node, keys = job, path.split(".")
        for k in keys[:-1]:
            node = node[k]
        if value is _DROP:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job, indent=1))
    return path


_DROP = object()


def _resolve(*argv):
    from experiments.gsm8k_reft import build_parser, resolve_config

    return resolve_config(build_parser().parse_args(list(argv)))


def test_a_job_resolves_to_the_settings_its_fields_name_and_equals_the_set_line(tmp_path):
    from experiments.gsm8k_reft import preset_config
    from reftjax.config import to_dict

    out = str(tmp_path / "out")
    cfg = _resolve("--openai-job", str(_job(tmp_path)), "--out", out)
    d = cfg.data
    train, val = str(tmp_path / "data" / "train.jsonl"), str(tmp_path / "data" / "val.jsonl")
    assert (d.train_file, d.val_file, d.test_file, d.train_format) == (train, val, val, "openai")
    assert (d.n_train, d.n_val, d.n_test, d.prompt.style, cfg.sft.epochs) == (None, None, None, "chat", 0)
    # 2 epochs (rl.epochs; rl.iterations, the preset's, is not read): of 10 examples in batches of 3, the RL loader's
    # 3 batches an epoch (its last incomplete one dropped), counted by the run on the prompts the length limits keep
    assert (cfg.rl.prompts_per_iteration, cfg.rl.epochs, cfg.rl.eval_every) == (3, 2, 2)
    assert cfg.rl.with_epochs_counted(10).iterations == 6 and cfg.rl.with_epochs_counted(8).iterations == 4
    assert cfg.rl.iterations == preset_config("cpu").rl.iterations
    assert cfg.rl.optim.learning_rate == preset_config("cpu").rl.optim.learning_rate * 0.5 == 1.5e-6
    assert (cfg.seed, cfg.name, cfg.model, cfg.grader_dict) == (7, "rft_run", "my-org/my-model", GRADER)
    # the job is the README's --set line for the same run, nothing more
    sets = [f"data.train_file={json.dumps(train)}", 'data.train_format="openai"', f"data.val_file={json.dumps(val)}",
            f"data.test_file={json.dumps(val)}", 'data.prompt.style="chat"', "sft.epochs=0", "data.n_train=null",
            "data.n_val=null", "data.n_test=null", 'name="rft_run"', f"grader={json.dumps(GRADER)}",
            "rl.prompts_per_iteration=3", "rl.epochs=2", "rl.eval_every=2", "rl.optim.learning_rate=1.5e-6"]
    by_hand = _resolve("--model", "my-org/my-model", "--seed", "7", "--out", out,
                       *[a for s in sets for a in ("--set", s)])
    assert to_dict(cfg) == to_dict(by_hand)


def test_the_command_line_wins_and_auto_or_absent_fields_keep_the_preset(tmp_path):
    from experiments.gsm8k_reft import preset_config

    other = tmp_path / "held_out.jsonl"
    other.write_text(_rows(2))
    cfg = _resolve("--openai-job", str(_job(tmp_path)), "--model", "other/model", "--seed", "3",
                   "--set", "rl.iterations=5", "--set", 'rl.optim={"learning_rate": 1e-5}', "--set", 'name="mine"',
                   "--set", f"data.test_file={json.dumps(str(other))}", "--set", "data.n_train=4")
    assert (cfg.model, cfg.seed, cfg.rl.iterations, cfg.rl.optim.learning_rate) == ("other/model", 3, 5, 1e-5)
    assert cfg.rl.epochs is None  # (the job's n_epochs would decide the length in place of the --set iterations)
    assert _resolve("--openai-job", str(_job(tmp_path)), "--set", "rl.epochs=5").rl.epochs == 5
    assert (cfg.name, cfg.data.test_file, cfg.data.n_train) == ("mine", str(other), 4)
    hyper = "method.reinforcement.hyperparameters."
    auto = {hyper + k: "auto" for k in ("batch_size", "n_epochs", "learning_rate_multiplier", "eval_interval")}
    cfg = _resolve("--openai-job", str(_job(tmp_path, seed=None, suffix=_DROP, **auto)))
    preset = preset_config("cpu")
    assert (cfg.rl.prompts_per_iteration, cfg.rl.iterations, cfg.rl.eval_every, cfg.rl.optim.learning_rate, cfg.seed) \
        == (preset.rl.prompts_per_iteration, preset.rl.iterations, preset.rl.eval_every,
            preset.rl.optim.learning_rate, preset.seed) and cfg.rl.epochs is None
    assert cfg.name != "rft_run"
    # the job as sent to OpenAI (an OpenAI model) runs with --model naming the checkpoint
    cfg = _resolve("--openai-job", str(_job(tmp_path, model="o4-mini-2025-04-16")), "--model", "other/model")
    assert cfg.model == "other/model"
    # without a validation file the test split would be GSM8K's (a grader reading the job's fields fails on it after
    # the model loads; one that reads none tests the job on GSM8K): refused unless --set names a test file; the
    # training file is then split as any train file is (data.val_fraction 0.05: 2 of 40 held out), and an epoch
    # counts the 38 training examples
    (tmp_path / "data" / "big.jsonl").write_text(_rows(40))
    job = _job(tmp_path, validation_file=_DROP, training_file="data/big.jsonl", **{hyper + "n_epochs": 1})
    with pytest.raises(ValueError, match=f"^{job}: validation_file: missing: the test split would be GSM8K's"):
        _resolve("--openai-job", str(job))
    cfg = _resolve("--openai-job", str(job), "--set", f"data.test_file={json.dumps(str(other))}")
    assert (cfg.data.val_file, cfg.data.test_file, cfg.rl.epochs) == (None, str(other), 1)
    # on the gpu/tpu presets too every epoch runs: they stop early after 5 validations without a gain, OpenAI never
    assert preset_config("gpu").rl.early_stop_patience > 0
    assert _resolve("--openai-job", str(_job(tmp_path)), "--preset", "gpu").rl.early_stop_patience == 0
    # the command line's own settings are checked with the job's: a grader the config refuses is replaced by one of
    # another type (one of its type updates its fields, as a second --set grader does), a bad --seed is not the
    # job's, nor a --set batch too large for it
    bad = _job(tmp_path, **{"method.reinforcement.grader": {**GRADER, "x": 1}})
    cfg = _resolve("--openai-job", str(bad), "--set", 'grader={"type": "reft", "cot": "nl"}')
    assert cfg.grader_dict == {"type": "reft", "cot": "nl"}
    cfg = _resolve("--openai-job", str(_job(tmp_path)), "--set", 'grader={"type": "string_check", "operation": "ne"}')
    assert cfg.grader_dict == {**GRADER, "operation": "ne"}
    twice = _resolve("--set", f"grader={json.dumps(GRADER)}", "--set", 'grader={"type": "reft", "cot": "nl"}')
    assert twice.grader_dict == {"type": "reft", "cot": "nl"}  # (it was merged into the first: unknown keys)
    merged = _resolve("--set", 'grader={"type": "reft", "answer_type": "mathqa"}', "--set",
                      'grader={"type": "reft", "cot": "nl"}')  # one type: updated, as before
    assert merged.grader_dict == {"type": "reft", "answer_type": "mathqa", "cot": "nl"}
    for argv, says in ((("--seed", "-1"), "seed must be >= 0, got -1"),
                       (("--set", "rl.prompts_per_iteration=64"), "rl.prompts_per_iteration=64 (--set, or the preset")):
        with pytest.raises(ValueError) as e:
            _resolve("--openai-job", str(_job(tmp_path)), *argv)
        assert says in str(e.value) and "job.json" not in str(e.value), str(e.value)
    # settings the job sets that the command line changes with their partners: a training file (with its format),
    # a P-CoT grader with the prompt style it needs
    big = str(tmp_path / "data" / "big.jsonl")
    cfg = _resolve("--openai-job", str(_job(tmp_path)), "--set", f"data.train_file={json.dumps(big)}")
    assert (cfg.data.train_file, cfg.data.train_format, cfg.rl.epochs) == (big, "openai", 2)
    pcot = _job(tmp_path, **{"method.reinforcement.grader": {"type": "reft", "cot": "python"}})
    cfg = _resolve("--openai-job", str(pcot), "--set", 'data.prompt.style="chat-python"', "--set", "rl.iterations=1")
    assert (cfg.grader_dict["cot"], cfg.data.prompt.style) == ("python", "chat-python")


_HYPER = "method.reinforcement.hyperparameters."


@pytest.mark.parametrize("changes, says", [
    ({"method": _DROP}, "method: missing: reftjax runs reinforcement jobs"),
    ({"method.type": "supervised"}, 'method.type: "supervised": reftjax runs "reinforcement" jobs'),
    ({"hyperparameters": {"n_epochs": 1}}, "hyperparameters: the top-level field is OpenAI's deprecated one"),
    ({"trainig_file": "x"}, "trainig_file: not a field reftjax reads here"),
    ({_HYPER + "n_epoch": 2}, _HYPER + "n_epoch: not a field reftjax reads here"),
    ({_HYPER + "compute_multiplier": 2}, _HYPER + "compute_multiplier: 2: no counterpart"),
    ({_HYPER + "eval_samples": 4}, _HYPER + "eval_samples: 4: no counterpart"),
    ({_HYPER + "reasoning_effort": "high"}, _HYPER + 'reasoning_effort: "high": not offered'),
    ({"method.reinforcement.response_format": {"type": "json_schema"}}, "response_format: structured outputs"),
    ({"integrations": [{"type": "wandb"}]}, "integrations: not offered"),
    ({"model": "o4-mini-2025-04-16"}, 'model: "o4-mini-2025-04-16" is an OpenAI model'),
    ({"model": "ft:gpt-4.1-mini:org::abc"}, "is an OpenAI model"),
    ({"model": 3}, "model: expected a Hugging Face id or path, got 3"),
    ({"training_file": "file-abc123"}, "training_file: file-abc123: no such file (an OpenAI file id"),
    ({"training_file": _DROP}, "training_file: missing"),
    ({"validation_file": "nope.jsonl"}, "validation_file: nope.jsonl: no such file"),
    ({_HYPER + "batch_size": 0}, _HYPER + 'batch_size: expected an integer >= 1 or "auto", got 0'),
    ({_HYPER + "batch_size": True}, _HYPER + "batch_size: expected an integer"),
    ({_HYPER + "n_epochs": 1.5}, _HYPER + "n_epochs: expected an integer"),
    ({_HYPER + "learning_rate_multiplier": -1}, "learning_rate_multiplier: expected a number > 0"),
    ({"seed": -1}, "seed: expected an integer from 0 to 2**32 - 1, got -1"),
    ({"seed": 2**32}, "seed: expected an integer from 0 to 2**32 - 1, got 4294967296"),
    # the config's own checks of what the job set, naming the job's field
    ({"method.reinforcement.grader": {**GRADER, "operation": "nope"}}, "method.reinforcement.grader: grader: "),
    ({"method.reinforcement.grader": {**GRADER, "operaton": "eq"}}, "method.reinforcement.grader: grader: unknown"),
    ({"suffix": 5}, "suffix: config.name: expected a string, got 5"),
    ({"suffix": ""}, "suffix: name='': a run's name is its folder"),
    ({_HYPER + "eval_interval": -2}, "eval_interval: expected an integer >= 1"),
    ({_HYPER + "batch_size": 11}, "batch_size: an epoch of 10 training examples holds no batch of 11 prompts"),
    ({_HYPER + "batch_size": 11, _HYPER + "n_epochs": "auto"}, "batch_size: an epoch of 10 training examples"),
    # a null field is left out: a null validation file is none (the test split would be GSM8K's)
    ({"validation_file": None}, "validation_file: missing: the test split would be GSM8K's"),
    ({"model": "GPT-4o"}, 'model: "GPT-4o" is an OpenAI model'),
    ({"method.type": _DROP}, 'method.type: null: reftjax runs "reinforcement" jobs'),
    ({"method.type": "supervised", "method.supervised": {"hyperparameters": {"n_epochs": 1}}},
     'method.type: "supervised": reftjax runs "reinforcement" jobs'),
    ({"training_file": ""}, 'training_file: expected a file path, got ""'),
    ({"training_file": "data"}, "training_file: data: no such file"),  # (a folder)
    ({_HYPER + "learning_rate_multiplier": 0}, 'learning_rate_multiplier: expected a number > 0 or "auto", got 0'),
    ({_HYPER + "learning_rate_multiplier": float("inf")}, "learning_rate_multiplier: expected a number > 0"),
    ({_HYPER + "learning_rate_multiplier": True}, "learning_rate_multiplier: expected a number > 0"),
    ({"seed": True}, "seed: expected an integer from 0 to 2**32 - 1, got true"),
    # NaN / Infinity (Python's json reads them; JSON has none) are named with their place in the grader; they were
    # refused as 'expected an object such as {"type": "reft"}' (session 55's list)
    ({"method.reinforcement.grader": {"type": "reft", "partial_reward": float("nan")}},
     "job.json: method.reinforcement.grader.partial_reward: NaN is not a number a job can hold"),
    ({"method.reinforcement.grader": {"type": "multi", "calculate_output": "a", "graders": {
        "a": {"type": "score_model", "model": "m", "input": "{{sample.output_text}}", "range": [0, float("inf")]}}}},
     "job.json: method.reinforcement.grader.graders.a.range[1]: Infinity is not a number"),
    # the grader's message says "named": the job's field is that of the setting named first (grader), not suffix
    ({"method.reinforcement.grader": {"type": "multi", "graders": {}, "calculate_output": "a"}},
     "job.json: method.reinforcement.grader: grader.graders: must be a non-empty object of named graders"),
])
def test_a_job_reftjax_cannot_run_as_written_is_refused_naming_the_file_and_field(tmp_path, changes, says):
    from reftjax.openai_job import JobError

    job = _job(tmp_path, **changes)
    with pytest.raises(JobError) as e:
        _resolve("--openai-job", str(job))
    assert str(e.value).startswith(f"{job}: ") and says in str(e.value), str(e.value)


def test_a_minimal_job_keeps_the_preset_and_null_or_neutral_fields_are_accepted(tmp_path):
    """A job of files and a grader alone keeps the preset's model, seed and RL settings; null fields are left out, and
    the refused fields' values that ask for what reftjax does anyway (compute_multiplier 1, reasoning_effort
    "default", no integrations) run. A batch of all the training examples is one batch an epoch; a seed of 0 (the
    job's, or --seed's over the job's) is a seed."""
    from experiments.gsm8k_reft import preset_config

    preset = preset_config("cpu")
    expected = ("default", 0, 8, None, 3, 3e-6)  # the cpu preset's (written out: not read from the code under test)
    assert (preset.model, preset.seed, preset.rl.prompts_per_iteration, preset.rl.epochs, preset.rl.eval_every,
            preset.rl.optim.learning_rate) == expected

    def settings(cfg):
        return (cfg.model, cfg.seed, cfg.rl.prompts_per_iteration, cfg.rl.epochs, cfg.rl.eval_every,
                cfg.rl.optim.learning_rate)

    minimal = _job(tmp_path, model=_DROP, seed=_DROP, suffix=_DROP, metadata=_DROP,
                   **{"method.reinforcement.hyperparameters": _DROP})
    cfg = _resolve("--openai-job", str(minimal))
    assert settings(cfg) == expected and cfg.data.train_file == str(tmp_path / "data" / "train.jsonl")
    nulls = {_HYPER + k: None for k in ("batch_size", "n_epochs", "learning_rate_multiplier", "eval_interval",
                                        "compute_multiplier", "eval_samples", "reasoning_effort")}
    cfg = _resolve("--openai-job", str(_job(tmp_path, model=None, seed=None, suffix=None, integrations=None,
                                            **nulls)))
    assert settings(cfg) == expected and cfg.name != "None"
    neutral = _job(tmp_path, seed=0, integrations=[], **{_HYPER + "compute_multiplier": 1, _HYPER + "batch_size": 10})
    cfg = _resolve("--openai-job", str(neutral))
    assert (cfg.seed, cfg.rl.prompts_per_iteration, cfg.rl.epochs) == (0, 10, 2)
    assert cfg.rl.with_epochs_counted(10).iterations == 2
    assert _resolve("--openai-job", str(_job(tmp_path)), "--seed", "0").seed == 0  # (the job's seed is 7)


def test_a_job_named_by_a_relative_path_or_with_home_paths_names_its_files_absolutely(tmp_path, monkeypatch):
    train, val = str(tmp_path / "data" / "train.jsonl"), str(tmp_path / "data" / "val.jsonl")
    _job(tmp_path)
    monkeypatch.chdir(tmp_path)
    for path in ("job.json", os.path.join("data", "..", "job.json")):
        d = _resolve("--openai-job", path).data
        assert (d.train_file, d.val_file, d.test_file) == (train, val, val), path
    monkeypatch.chdir(tmp_path / "data")
    assert _resolve("--openai-job", os.path.join("..", "job.json")).data.train_file == train
    monkeypatch.setenv("HOME", str(tmp_path / "data"))
    assert _resolve("--openai-job", str(_job(tmp_path, training_file="~/train.jsonl"))).data.train_file == train


def test_an_error_is_the_jobs_when_its_settings_alone_fail_else_the_command_lines(tmp_path):
    """Both at fault: the job's own error, its field named (not the command line's error named as the job's); a job
    error the command line mends (a training file large enough for the job's batch) leaves the command line's."""
    from reftjax.openai_job import JobError

    bad = _job(tmp_path, **{"method.reinforcement.grader": {**GRADER, "operation": "nope"}})
    with pytest.raises(JobError) as e:
        _resolve("--openai-job", str(bad), "--seed", "-1")
    assert str(e.value) == f"{bad}: method.reinforcement.grader: grader: operation must be eq, ne, like or ilike"
    (tmp_path / "data" / "big.jsonl").write_text(_rows(40))
    big = "data.train_file=" + json.dumps(str(tmp_path / "data" / "big.jsonl"))
    job = _job(tmp_path, **{_HYPER + "batch_size": 11})
    assert _resolve("--openai-job", str(job), "--set", big).rl.prompts_per_iteration == 11
    with pytest.raises(ValueError) as e:
        _resolve("--openai-job", str(job), "--set", big, "--seed", "-1")
    assert not isinstance(e.value, JobError) and str(e.value) == "seed must be >= 0, got -1", str(e.value)


def test_the_model_is_read_from_the_job_files_folder_and_a_local_folder_named_like_an_openai_model_loads(
        tmp_path, monkeypatch):
    (tmp_path / "models" / "gpt-oss-20b").mkdir(parents=True)
    job = _job(tmp_path, model="models/gpt-oss-20b")
    monkeypatch.chdir(tmp_path / "data")  # not the job's folder: the path is the job's, as the data files are
    assert _resolve("--openai-job", str(job)).model == str(tmp_path / "models" / "gpt-oss-20b")
    monkeypatch.chdir(tmp_path / "models")  # a name that is an OpenAI model's, and a local folder here
    assert _resolve("--openai-job", str(_job(tmp_path, model="gpt-oss-20b"))).model == "gpt-oss-20b"
    assert _resolve("--openai-job", str(_job(tmp_path, model="org/hub-model"))).model == "org/hub-model"


def test_a_file_that_is_no_job_object_is_refused_with_its_line(tmp_path):
    from reftjax.openai_job import JobError, read_job

    bad = tmp_path / "job.json"
    for text, says in (('{\n "model": "x",\n "seed": }', f"{bad}:3:10: not JSON"),
                       ("[1]", "a job is a JSON object"), ('{"seed": 1, "seed": 2}', "seed")):
        bad.write_text(text)
        with pytest.raises(JobError, match=r"^" + str(bad)) as e:
            read_job(str(bad))
        assert says in str(e.value)
    with pytest.raises(JobError, match="cannot read the job file"):
        read_job(str(tmp_path / "missing.json"))


def test_the_cli_prints_a_job_error_on_one_line_and_exits_2(tmp_path, capsys):
    from experiments.gsm8k_reft import main

    job = _job(tmp_path, **{_HYPER + "eval_samples": 4})
    assert main(["--openai-job", str(job), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {job}: {_HYPER}eval_samples")
    assert main(["--openai-job", str(_job(tmp_path)), "--print-config", "--out", str(tmp_path / "o")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["grader"], shown["rl"]["epochs"]) == (GRADER, 2)


def test_the_svamp_command_takes_no_job():
    from experiments.svamp_reft import main

    with pytest.raises(SystemExit) as e:
        main(["--openai-job", "job.json"])
    assert e.value.code == 2


def test_a_report_whose_test_file_is_the_validation_file_says_it_is_not_held_out(tmp_path, caplog):
    import dataclasses

    from reftjax.config import ExperimentConfig
    from reftjax.report import write_summary
    from reftjax.train import read_splits

    val = tmp_path / "val.jsonl"
    val.write_text(_rows(4))
    (tmp_path / "train.jsonl").write_text(_rows(8))
    base = ExperimentConfig()
    cfg = dataclasses.replace(base, grader=tuple(GRADER.items()), data=dataclasses.replace(
        base.data, train_file=str(tmp_path / "train.jsonl"), train_format="openai", val_file=str(val),
        test_file=os.path.join(str(tmp_path), "..", tmp_path.name, "val.jsonl")))  # the same file, spelt apart
    evals = {"test_sft": {"accuracy": 0.5, "n": 4}, "test_reft": {"accuracy": 0.5, "n": 4}}
    with caplog.at_level("WARNING", logger="reftjax.train"):
        splits = read_splits(cfg)
    assert len(splits.test) == len(splits.val) == 4
    assert [r.message for r in caplog.records if "data.test_file is data.val_file" in r.message]
    assert not [r for r in caplog.records if "data.val_file is data.train_file" in r.message]
    os.link(tmp_path / "train.jsonl", tmp_path / "linked.jsonl")  # one file under another name: validation on it
    caplog.clear()
    with caplog.at_level("WARNING", logger="reftjax.train"):
        read_splits(dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, val_file=str(tmp_path / "linked.jsonl"), test_file=str(val))))
    assert [r.message for r in caplog.records if "data.val_file is data.train_file" in r.message]
    write_summary(tmp_path, cfg, evals, 1.0)
    md = (tmp_path / "summary.md").read_text()
    assert "It is the validation file (data.val_file), which selects the best checkpoint" in md
    assert "never on test" not in md
    write_summary(tmp_path, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_file=str(tmp_path /
                                                                                                    "train.jsonl"))),
                  evals, 1.0)
    assert "never on test" in (tmp_path / "summary.md").read_text()


def test_n_epochs_is_rl_epochs_and_a_run_begun_before_rl_epochs_keeps_its_counted_iterations(tmp_path):
    """A job's n_epochs is rl.epochs, counted by the run on the prompts the length limits keep. A job's run begun
    before rl.epochs (its config.json has none) keeps rl.iterations = n_epochs x (examples // batch size), so the
    same command still resumes it; rl.iterations and rl.epochs both on the command line are refused."""
    from reftjax.config import RLConfig, replace_path, to_dict

    job, out = str(_job(tmp_path)), tmp_path / "out"
    cfg = _resolve("--openai-job", job, "--out", str(out))
    assert (cfg.rl.epochs, cfg.rl.prompts_per_iteration) == (2, 3)
    began = to_dict(cfg)
    del began["rl"]["epochs"]
    began["rl"]["iterations"] = 6
    out.mkdir()
    (out / "config.json").write_text(json.dumps(began))
    old = _resolve("--openai-job", job, "--out", str(out))
    assert (old.rl.epochs, old.rl.iterations) == (None, 2 * (10 // 3))
    from reftjax.train import _check_same_run

    _check_same_run(out / "config.json", to_dict(old))  # (the new key at its default: free)
    (out / "config.json").write_text(json.dumps(to_dict(old)))  # as the resumed run rewrites it: rl.epochs null
    again = _resolve("--openai-job", job, "--out", str(out))  # (it took rl.epochs=2 and was refused; found running it)
    assert (again.rl.epochs, again.rl.iterations) == (None, 6)
    _check_same_run(out / "config.json", to_dict(again))
    with pytest.raises(Exception, match="other settings"):
        _check_same_run(out / "config.json", to_dict(cfg))
    (out / "config.json").write_text(json.dumps(to_dict(cfg)))  # begun with rl.epochs: rl.iterations is not read
    _check_same_run(out / "config.json", to_dict(replace_path(cfg, "rl.iterations", 77)))
    with pytest.raises(Exception, match="rl.epochs: 2 -> 3"):
        _check_same_run(out / "config.json", to_dict(_resolve("--openai-job", job, "--set", "rl.epochs=3")))
    with pytest.raises(ValueError, match="--set rl.iterations and rl.epochs: set one"):
        _resolve("--set", "rl.iterations=4", "--set", "rl.epochs=1")
    assert _resolve("--set", "rl.iterations=4", "--set", "rl.epochs=null").rl.iterations == 4
    with pytest.raises(ValueError, match="rl.epochs must be >= 0 or null, got -1"):
        RLConfig(epochs=-1)
    assert not RLConfig(iterations=5, epochs=0).runs and RLConfig(iterations=5).runs
    assert RLConfig(epochs=3, prompts_per_iteration=4).with_epochs_counted(11).iterations == 6
    # a run begun before rl.epochs with batches of 4: n_epochs x whole batches, 2 x (10 // 4) = 4 (not 2 x 10 // 4)
    out4 = tmp_path / "out4"
    out4.mkdir()
    (out4 / "config.json").write_text(json.dumps({**began, "rl": {**began["rl"], "prompts_per_iteration": 4}}))
    job4 = str(_job(tmp_path, **{_HYPER + "batch_size": 4}))
    assert _resolve("--openai-job", job4, "--out", str(out4)).rl.iterations == 4
