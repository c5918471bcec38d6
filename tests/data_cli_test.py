"""``python -m reftjax.data stats`` (tokenizer injected to avoid a second 10 s load)."""
import json

import numpy as np
import pytest

import reftjax.hf
from reftjax.data.__main__ import main


@pytest.fixture
def cli(monkeypatch, smollm_tokenizer, capsys):
    monkeypatch.setattr(reftjax.hf, "load_tokenizer", lambda src: smollm_tokenizer)

    def run(*argv):
        code = main(["stats", *argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_stats_on_a_reft_file(cli, shared_data, smollm_tokenizer):
    path = shared_data / "reft" / "svamp_nl.json"
    code, out, _ = cli("--file", str(path), "--format", "reft", "--max-target-len", "100")
    assert code == 0 and len(out.splitlines()) == 1
    result = json.loads(out)
    assert result["examples"] == 3076 and result["style"] == "reft"
    # Independent count of targets over 100 tokens (+1 for EOS).
    raw = json.loads(path.read_text())
    texts = [f"{r['answer_cot'].strip()}\nTherefore, the answer is: {r['answer_value'].strip()}"
             for r in raw]
    lengths = np.array([len(x) + 1 for x in smollm_tokenizer(texts, add_special_tokens=False)["input_ids"]])
    assert result["over_max_target_len"] == int((lengths > 100).sum()) > 0
    assert result["target_tokens_incl_eos"]["p100"] == lengths.max()


def test_stats_prompt_only_and_bad_file(cli, shared_data, tmp_path):
    code, out, _ = cli("--file", str(shared_data / "reft" / "gsm8k_test_set.json"), "--format", "reft")
    result = json.loads(out)
    assert code == 0 and result["examples"] == 1319 and "target_tokens_incl_eos" not in result
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    code, out, err = cli("--file", str(bad), "--format", "gsm8k-jsonl")
    assert code == 2 and out == "" and "bad.jsonl:2: missing field 'answer'" in err
