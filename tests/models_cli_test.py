"""`python -m reftjax.models score`: log-probs checked against torch on a tiny exported model."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from reftjax.hf import save_hf
from reftjax.models import ModelConfig
from reftjax.models.__main__ import main

torch = pytest.importorskip("torch")

WORDS = "<pad> <s> </s> <unk> the a cat dog sat on mat ran and . fox quick brown over lazy jumps".split()
CFG = ModelConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=True)
TEXT = "the quick brown fox jumps over the lazy dog . the cat sat on a mat and the dog ran"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, random_params):
    """A tiny tied-embedding Llama with a word-level tokenizer, exported as an HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>")
    hf = LlamaConfig(vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size,
                     intermediate_size=CFG.intermediate_size, num_hidden_layers=CFG.num_layers,
                     num_attention_heads=CFG.num_heads, num_key_value_heads=CFG.num_kv_heads,
                     rms_norm_eps=CFG.rms_norm_eps, max_position_embeddings=CFG.max_position_embeddings,
                     tie_word_embeddings=True)
    return save_hf(tmp_path_factory.mktemp("cli") / "tiny", random_params(CFG, std=0.3), CFG, hf, tok)


def _torch_logprobs(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_score_matches_torch(model_dir, tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT)
    assert main(["score", "--model", str(model_dir), "--text-file", str(text_file)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert result["tokens"] == TEXT.split() and result["num_tokens"] == len(TEXT.split())
    assert result["logprobs"][0] is None and len(result["logprobs"]) == result["num_tokens"]
    ids = [WORDS.index(w) for w in TEXT.split()]
    want = _torch_logprobs(model_dir, ids)
    got = np.array(result["logprobs"][1:])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert want.std() > 0.1  # the random model is far from uniform: the comparison is meaningful
    assert result["perplexity"] == pytest.approx(math.exp(-want.mean()), rel=1e-4)
    assert main(["score", "--model", str(model_dir), "--text-file", str(text_file), "--dtype", "bfloat16"]) == 0
    bf16 = np.array(json.loads(capsys.readouterr().out)["logprobs"][1:])
    # bf16 (8 mantissa bits) with these large random weights: measured max 0.26, mean 0.07
    assert np.abs(bf16 - want).max() < 0.5 and np.abs(bf16 - want).mean() < 0.15


def test_score_too_short_text_is_an_error(model_dir, tmp_path, capsys):
    text_file = tmp_path / "one.txt"
    text_file.write_text("cat")
    assert main(["score", "--model", str(model_dir), "--text-file", str(text_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "one.txt: text has 1 token(s)" in err


def _run(*args):
    return subprocess.run([sys.executable, "-m", "reftjax.models", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_missing_files_exit_2(model_dir, tmp_path):
    proc = _run("score", "--model", str(model_dir), "--text-file", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing.txt'}: text file not found"
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT)
    assert main(["score", "--model", str(tmp_path / "nomodel.gguf"), "--text-file", str(text_file)]) == 2


def test_cli_help():
    proc = _run("score", "--help")
    assert proc.returncode == 0 and "--text-file" in proc.stdout and "--dtype" in proc.stdout


def test_cli_unreadable_text_files_are_one_line_errors(tmp_path, capsys):
    """A directory or a file that is not UTF-8 as --text-file: one line naming it, exit 2, before any model loads
    (the model named here does not exist). Untested before (mutation review, session 45)."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the cat \xff sat")
    for path, message in ((bad, "not valid UTF-8 (invalid start byte at byte 8)"),
                          (tmp_path, "is a directory, not a text file")):
        assert main(["score", "--model", str(tmp_path / "nomodel"), "--text-file", str(path)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: {path}: {message}\n"


def test_dtype_sets_the_weights_dtype_too(model_dir, tmp_path, monkeypatch, capsys):
    """--dtype is the "compute (and storage) dtype": bfloat16 loads bfloat16 weights (float32 ones passed the
    log-prob tolerance; mutation review, session 45)."""
    import jax

    import reftjax.hf

    loaded = []
    real = reftjax.hf.load_model
    monkeypatch.setattr(reftjax.hf, "load_model", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT)
    for dtype in ("bfloat16", "float32"):
        assert main(["score", "--model", str(model_dir), "--text-file", str(text_file), "--dtype", dtype]) == 0
        assert {str(x.dtype) for x in jax.tree.leaves(loaded[-1].params)} == {dtype}
    capsys.readouterr()
