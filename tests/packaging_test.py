"""pyproject.toml declares every third-party package the runtime code imports.

`requests` (the GSM8K builder's probe), `huggingface_hub`, `ml_dtypes` and `tokenizers` were imported by reftjax and
reached an install only through another package's requirements (session 35's list): a change upstream, or a user
pinning around it, would have broken `import` at run time. Read statically (every `import` in reftjax/ and
experiments/, at any depth: the lazy ones too), mapped to distributions by the installed metadata."""
import ast
import pathlib
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(folders) -> dict[str, list[str]]:
    """Top-level third-party module -> the `file:line`s importing it."""
    found = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("reftjax", "experiments"):
                        found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_package_the_runtime_imports_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_norm(re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    owners = packages_distributions()
    found = _imports(["reftjax", "experiments"])
    assert {"jax", "flax", "optax", "orbax", "transformers", "tensorflow_datasets"} <= set(found)  # the walk sees them
    aliases = {"orbax": "orbax-checkpoint"}  # (a namespace package the metadata may not map, e.g. editable installs)
    undeclared = {top: where[:3] for top, where in found.items()
                  if not {_norm(d) for d in owners.get(top) or [aliases.get(top, top)]} & declared}
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
    assert "torch" not in found, f"torch is a test-only dependency, imported at {found.get('torch')}"


def test_a_torch_free_run_does_not_start_with_transformers_warning_that_models_are_unavailable():
    """Without torch (the README's main command installs none), importing transformers warned "PyTorch was not
    found. Models won't be available ...", the first line of every run, reading like a broken install; reftjax
    needs no torch model. Its other warnings still show. torch is hidden the way transformers probes it
    (`importlib.util.find_spec`, None for a module set to None)."""
    import subprocess

    def stderr(first: str) -> str:
        code = ("import sys; sys.modules['torch'] = None\n" + first +
                "import transformers\nfrom transformers.utils import logging\n"
                "assert not transformers.is_torch_available()\nlogging.get_logger('transformers').warning('another')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "PyTorch was not found" in stderr("")  # transformers alone: the warning
    out = stderr("import reftjax\n")
    assert "PyTorch was not found" not in out and "another" in out
