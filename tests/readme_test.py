"""README.md's promises, checked against the code: CI runs exactly its test command, its main command is the default
experiment, and its Python example runs as printed (on the tiny test model instead of SmolLM2, same calls)."""
import contextlib
import io
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(heading_text: str, lang: str) -> str:
    """The first ```lang fenced block after the line containing `heading_text`."""
    start = README.index(heading_text)
    m = re.compile(rf"^```{lang}\n(.*?)^```", re.S | re.M).search(README, start)
    assert m, f"README.md: no ```{lang} block after {heading_text!r}"
    return m.group(1)


def test_ci_runs_exactly_the_readme_test_command():
    readme_cmd = _block_after("Run the tests", "bash").strip()
    ci_lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines()
                if l.strip() and not l.startswith("#") and not l.startswith(("set ", "cd "))]
    assert ci_lines == [readme_cmd]
    assert readme_cmd.startswith("pip install -e '.[test]'")
    assert readme_cmd.endswith("python -m pytest -q -n 2 --dist worksteal")


def test_readme_main_command_runs_the_default_experiment():
    cmd = _block_after("Run the main job", "bash").strip()
    assert "\n" not in cmd and cmd.startswith("pip install -e . ")
    assert cmd.endswith("&& python -m experiments.gsm8k_reft")  # the experiment on its default preset, no flags
    assert (ROOT / "experiments" / "gsm8k_reft.py").exists()


def test_readme_python_example_runs(tiny_hf_dir):
    """The "Using the pieces" example, executed as printed except for the model it loads."""
    code = _block_after("## Using the pieces", "python")
    assert code.count('load_model("default"') == 1
    code = code.replace('load_model("default"', f"load_model({str(tiny_hf_dir)!r}")
    out = io.StringIO()
    namespace = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (Using the pieces)", "exec"), namespace)
    printed = out.getvalue().strip()
    assert printed.startswith("['") and printed.endswith("']"), printed  # one generated string
    model, mesh = namespace["model"], namespace["mesh"]
    leaf = model.params["embed_tokens"]["embedding"]
    assert leaf.sharding.mesh == mesh  # "params placed with NamedSharding", as the example says
    for name in ("make_sft_step", "make_experience_fn", "make_ppo_step", "rollout", "init_state"):
        assert callable(namespace[name]), name
