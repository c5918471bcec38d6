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



def test_stats_measure_the_prompts_a_run_renders_with_its_system_prompt_and_template_variables(
        monkeypatch, capsys, shared_data, smollm_tokenizer):
    """data.prompt.system_prompt and chat_template_kwargs change a run's prompts, but the stats command could not
    take them, so it measured other prompts than the run's (left alone in session 38). A template that opens each
    reply with <think> unless enable_thinking is false (as Qwen3's does) stands in for a real one."""
    import copy

    tok = copy.deepcopy(smollm_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}{% endif %}")
    monkeypatch.setattr(reftjax.hf, "load_tokenizer", lambda src: tok)
    base = ["stats", "--dataset", "svamp-nl", "--local-dir", str(shared_data / "reft"), "--style", "chat"]

    def p50(*extra):
        assert main(base + list(extra)) == 0
        return json.loads(capsys.readouterr().out)["prompt_tokens"]["p50"]

    plain = p50()
    system = p50("--system-prompt", "Be brief and exact.")
    no_thinking = p50("--chat-template-kwargs", '{"enable_thinking": false}')
    marks = len(tok("<|im_start|>system\nBe brief and exact.<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert system == plain + marks  # a system turn only where one is given (this template writes none by default)
    assert no_thinking == plain - len(tok("<think>\n", add_special_tokens=False)["input_ids"])
    for extra, message in ((["--chat-template-kwargs", "{enable_thinking: false}"], "--chat-template-kwargs: not JSON"),
                           (["--style", "reft", "--system-prompt", "x"], "apply to the chat styles only"),
                           # (taken as pairs, or named the run's setting, or kept the last of a repeated name; review)
                           (["--chat-template-kwargs", '[["foo", 1]]'], "expected a JSON object"),
                           (["--chat-template-kwargs", "null"], "--chat-template-kwargs: expected a JSON object"),
                           (["--chat-template-kwargs", '{"a": [1]}'], "--chat-template-kwargs: "),
                           (["--chat-template-kwargs", '{"a": 1, "a": 2}'], "the name 'a' is given twice")):
        assert main(base + extra) == 2
        out, err = capsys.readouterr()
        assert out == "" and message in err and len(err.strip().splitlines()) == 1, err


def test_stats_count_the_bos_a_run_puts_before_plain_prompts(monkeypatch, capsys, shared_data):
    """data.prompt.bos (the paper preset's false) changes a plain-style run's prompts by one token, but the stats
    command could not take it (helper review, session 39). A tokenizer that adds <s> to every encoding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    monkeypatch.setattr(reftjax.hf, "load_tokenizer", lambda src: tok)

    def mean(*extra):
        assert main(["stats", "--dataset", "svamp-nl", "--local-dir", str(shared_data / "reft"), *extra]) == 0
        return json.loads(capsys.readouterr().out)["prompt_tokens"]["mean"]

    assert mean() == mean("--bos", "true") == mean("--bos", "false") + 1


def test_bos_true_puts_a_bos_before_prompts_a_tokenizer_encodes_without_one(monkeypatch, capsys, shared_data):
    """--bos true with a tokenizer that has a BOS but does not add it (auto = none): every prompt one token longer.
    The test above uses a tokenizer that adds <s>, where true and auto agree: --bos true read as auto passed
    (mutation review, session 49)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    monkeypatch.setattr(reftjax.hf, "load_tokenizer", lambda src: tok)

    def stats(*extra):
        assert main(["stats", "--dataset", "svamp-nl", "--local-dir", str(shared_data / "reft"), *extra]) == 0
        return json.loads(capsys.readouterr().out)["prompt_tokens"]

    auto, true, false = stats(), stats("--bos", "true"), stats("--bos", "false")
    assert auto == false
    assert {k: v - 1 for k, v in true.items()} == false


def test_stats_default_to_a_runs_limits_styles_and_split_and_count_at_the_limits(cli, shared_data, tmp_path):
    """The stats' defaults are a run's (TokenizeConfig's limits, the P-CoT style for svamp-python, chat for openai
    files, GSM8K's train split), a limit equal to the longest length drops nothing, over_either counts the examples
    over either limit, --keep-annotations keeps GSM8K's <<...>> calculator marks, and a limit of 0 is refused. Each
    could change without a failing test (mutation review, session 45)."""
    from reftjax.data.tokenize import TokenizeConfig

    code, out, _ = cli("--dataset", "svamp-python", "--local-dir", str(shared_data / "reft"))
    r = json.loads(out)
    assert code == 0 and (r["style"], r["max_prompt_len"], r["max_target_len"]) == \
        ("reft-python", TokenizeConfig().max_prompt_len, TokenizeConfig().max_target_len)
    gsm8k = tmp_path / "gsm8k"
    gsm8k.mkdir()
    long_q = "Tom has 2 apples, 4 pears, 6 plums, 8 figs and 10 kiwis in a big basket. " * 3 + "What is 2 + 0?"
    long_cot = "First 2 + 3 = <<2+3=5>>5, then 5 + 5 = <<5+5=10>>10. " * 3 + "So 4 + 4 = <<4+4=8>>8."
    rows = [(long_q, "2 + 0 = <<2+0=2>>2.\n#### 2"), ("What is 4 + 4?", long_cot + "\n#### 8"),  # (one long each)
            ("What is 1 + 1?", "1 + 1 = <<1+1=2>>2.\n#### 2"), ("What is 3 + 3?", "3 + 3 = <<3+3=6>>6.\n#### 6")]
    (gsm8k / "train.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    (gsm8k / "test.jsonl").write_text(json.dumps({"question": "What is 1 + 2?", "answer": "#### 3"}) + "\n")
    code, out, _ = cli("--dataset", "gsm8k", "--local-dir", str(gsm8k))
    r = json.loads(out)
    assert code == 0 and (r["source"], r["examples"]) == ("gsm8k:train", 4)
    (p100, p50), (t100, t50) = ((r[k]["p100"], r[k]["p50"]) for k in ("prompt_tokens", "target_tokens_incl_eos"))
    code, out, _ = cli("--dataset", "gsm8k", "--local-dir", str(gsm8k), "--max-prompt-len", str(p100),
                       "--max-target-len", str(t100))
    assert [json.loads(out)[k] for k in ("over_max_prompt_len", "over_max_target_len", "over_either")] == [0, 0, 0]
    code, out, _ = cli("--dataset", "gsm8k", "--local-dir", str(gsm8k), "--max-prompt-len", str(p50),
                       "--max-target-len", str(t50))
    assert [json.loads(out)[k] for k in ("over_max_prompt_len", "over_max_target_len", "over_either")] == [1, 1, 2]
    code, out, _ = cli("--dataset", "gsm8k", "--local-dir", str(gsm8k), "--keep-annotations")
    assert json.loads(out)["target_tokens_incl_eos"]["p100"] > t100
    openai = tmp_path / "o.jsonl"
    openai.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"}) + "\n")
    code, out, err = cli("--file", str(openai), "--format", "openai")
    assert code == 0 and json.loads(out)["style"] == "chat", err
    with pytest.raises(SystemExit) as exc:
        cli("--dataset", "svamp-nl", "--max-target-len", "0")
    assert exc.value.code == 2


def test_stats_on_a_file_where_only_some_examples_carry_a_cot(cli, tmp_path, smollm_tokenizer):
    """Such a file reported prompt lengths alone with exit 0 and no word of the examples without a CoT, where a run
    with an SFT warm-up refuses it (session 45's list): the targets of those with one, and a note naming the first
    without."""
    rows = [{"question": "How many apples?", "answer": "Three and four make 3 + 4 = 7.\n#### 7"},
            {"question": "How many pears?", "answer": "#### 5"},
            {"question": "How many plums in all the baskets?", "answer": "Two baskets of six: 2 * 6 = 12.\n#### 12"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = cli("--file", str(path), "--format", "gsm8k-jsonl", "--max-target-len", "24",
                         "--max-prompt-len", "1000")
    assert code == 0, err
    result = json.loads(out)
    texts = [f"{r['answer'].split('####')[0].strip()}\nTherefore, the answer is: {r['answer'].split('####')[1].strip()}"
             for r in (rows[0], rows[2])]
    lengths = [len(x) + 1 for x in smollm_tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert result["examples"] == 3 and result["examples_with_cot"] == 2
    assert result["target_tokens_incl_eos"]["p100"] == max(lengths)
    assert result["target_tokens_incl_eos"]["mean"] == round(sum(lengths) / 2, 1)
    assert result["over_max_target_len"] == result["over_either"] == sum(n > 24 for n in lengths) == 1, lengths
    assert "mixed.jsonl:2 " in err and "no reference CoT; 1 of 3 examples have none" in err and "sft.epochs=0" in err
    # A file where every example carries one: counted, and no note.
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], rows[2])))
    code, out, err = cli("--file", str(path), "--format", "gsm8k-jsonl")
    assert code == 0 and json.loads(out)["examples_with_cot"] == 2 and "note" not in err


def test_the_note_names_the_first_example_without_a_cot(cli, tmp_path):
    """Of several examples without a reference CoT, the note names the first in the file (a mutant naming the last
    passed: the test above has one; mutation review, session 46)."""
    rows = [{"question": "How many apples?", "answer": "3 + 4 = 7.\n#### 7"},
            {"question": "Pears?", "answer": "#### 5"},
            {"question": "Plums?", "answer": "2 * 6 = 12.\n#### 12"}, {"question": "Figs?", "answer": "#### 2"}]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = cli("--file", str(path), "--format", "gsm8k-jsonl")
    assert code == 0 and json.loads(out)["examples_with_cot"] == 2, err
    assert "note: " in err and "two.jsonl:2 (" in err and "two.jsonl:4" not in err and "2 of 4 examples" in err
