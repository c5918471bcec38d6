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


def test_usage_errors_exit_2_with_one_line(cli, shared_data, tmp_path):
    """--file without --format exited 1 (SystemExit text), --split on a ReFT dataset was ignored while the output
    said "svamp-nl:test", and --split validation ended in a traceback (helper review)."""
    code, out, err = cli("--file", str(tmp_path / "x.jsonl"))
    assert code == 2 and out == "" and "x.jsonl:0: --file needs --format" in err
    code, out, err = cli("--dataset", "svamp-nl", "--split", "test", "--local-dir", str(shared_data / "reft"))
    assert code == 2 and "--split applies to --dataset gsm8k only" in err
    code, out, _ = cli("--dataset", "svamp-nl", "--local-dir", str(shared_data / "reft"))
    assert code == 0 and json.loads(out)["source"] == "svamp-nl"
    code, out, err = cli("--dataset", "svamp-nl", "--answer-field", "x", "--local-dir", str(shared_data / "reft"))
    assert code == 2 and out == "" and "svamp-nl:0: --answer-field applies to --format openai files only" in err
    with pytest.raises(SystemExit) as exc:  # argparse: usage line, status 2
        cli("--dataset", "gsm8k", "--split", "validation")
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:  # (a negative length limit was taken; review, session 30)
        cli("--dataset", "svamp-nl", "--max-prompt-len", "-5")
    assert exc.value.code == 2


def test_a_bad_tokenizer_is_one_line_too(monkeypatch, capsys, shared_data, tmp_path):
    """--tokenizer pointing nowhere, or at a file that is not a checkpoint, was a traceback with exit 1 (review,
    session 30); the module's docstring promises exit 2 and one line."""
    for src in (tmp_path / "absent", tmp_path / "bad.gguf"):
        if src.suffix:
            src.write_bytes(b"not a gguf")
        code = main(["stats", "--dataset", "svamp-nl", "--local-dir", str(shared_data / "reft"),
                     "--tokenizer", str(src)])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err

