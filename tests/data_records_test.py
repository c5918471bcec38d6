"""Readers of GSM8K JSONL, ReFT-authors JSON and OpenAI RFT JSONL; splits."""
import json

import pytest

from reftjax.data.records import (DataError, parse_number, read_file, read_gsm8k_jsonl, read_openai_jsonl,
                                  read_reft_json, strip_annotations)
from reftjax.data.sources import SplitConfig, train_val_split

GOOD = {"question": "Q?", "answer": "a = <<1+1=2>>2\n#### 2"}


def _jsonl(tmp_path, lines, name="f.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("name,count,needs_cot", [
    ("svamp_nl.json", 3076, True), ("svamp_python_sdp.json", 3043, True),
    ("svamp_test_set.json", 1000, False), ("gsm8k_test_set.json", 1319, False)])
def test_reft_files_load_with_answers(shared_data, name, count, needs_cot):
    path = shared_data / "reft" / name
    examples = read_reft_json(path, require_cot=needs_cot)
    raw = json.loads(path.read_text())
    assert len(examples) == len(raw) == count
    for ex, r in zip(examples, raw):
        assert ex.item_id == r["item_id"] and ex.question == r["question"].strip()
        assert ex.answer_value == float(r["answer_value"].replace(",", ""))
        assert ex.cot == r.get("answer_cot", "").strip()
    assert bool(examples[0].cot) == needs_cot


def test_reft_line_numbers_point_at_the_object(tmp_path):
    items = [{"item_id": f"x_{i}", "question": "q", "answer_value": "1"} for i in range(3)]
    items[2]["answer_value"] = "abc"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(items, indent=2))
    lines = path.read_text().splitlines()
    brace_line = [i for i, l in enumerate(lines, 1) if l.strip() == "{"][2]
    with pytest.raises(DataError, match=rf"r\.json:{brace_line}: gold answer 'abc' is not a number"):
        read_reft_json(path)


def test_gsm8k_jsonl_splits_cot_and_answer(tmp_path):
    path = _jsonl(tmp_path, [GOOD, {"question": " Q2 ", "answer": "x\n#### 1,080"}])
    a, b = read_gsm8k_jsonl(path, "train")
    assert (a.cot, a.answer, a.answer_value) == ("a = <<1+1=2>>2", "2", 2.0)
    assert (b.question, b.answer, b.answer_value, b.item_id) == ("Q2", "1080", 1080.0, "gsm8k_train_1")


@pytest.mark.parametrize("bad,message", [
    ('{"question": "Q", "answer": ', r"f\.jsonl:2: malformed JSON"),
    ({"answer": "#### 1"}, r"f\.jsonl:2: missing field 'question'"),
    ({"question": "Q", "answer": "x\n#### "}, r"f\.jsonl:2: empty answer"),
    ({"question": "Q", "answer": "x\n#### seven"}, r"f\.jsonl:2: gold answer 'seven' is not a number"),
    ({"question": "Q", "answer": "no final line"}, r"f\.jsonl:2: answer has no '#### N' line"),
    ({"question": "", "answer": "#### 1"}, r"f\.jsonl:2: empty field 'question'"),
    ('[1, 2]', r"f\.jsonl:2: expected a JSON object"),
    # accepted and changed before session 35 (review): 3,5 was gold 35 and the first "#### 5" trained on as text
    ({"question": "Q", "answer": "7/2\n#### 3,5"}, r"f\.jsonl:2: gold answer '3,5' is not a number \(commas sep"),
    ({"question": "Q", "answer": "x\n#### 1,2"}, r"gold answer '1,2' is not a number"),
    ({"question": "Q", "answer": "x\n#### ,5"}, r"gold answer ',5' is not a number"),
    ({"question": "Q", "answer": "x\n#### 1_000"}, r"gold answer '1_000' is not a number"),
    ({"question": "Q", "answer": "x\n#### \u0661\u0662"}, r"is not a number"),
    ({"question": "Q", "answer": "3+2=5\n#### 5\nate one\n#### 4"}, r"f\.jsonl:2: answer has 2 '####' markers"),
])
def test_gsm8k_bad_lines_name_file_and_line(tmp_path, bad, message):
    with pytest.raises(DataError, match=message):
        read_gsm8k_jsonl(_jsonl(tmp_path, [GOOD, bad]))


@pytest.mark.parametrize("text,value", [("1,080", 1080.0), ("-3.5", -3.5), ("1,234,567.25", 1234567.25), ("+7", 7.0),
                                        (".5", 0.5), ("5.", 5.0), ("1e-05", 1e-05), ("2.5E+3", 2500.0), ("007", 7.0)])
def test_gold_numbers_the_readers_take(text, value):
    """What gold answers look like (every GSM8K and ReFT-authors' answer in ../shared matches) and JSON numbers print
    as (`str(1e-05)`)."""
    assert parse_number(text, "f:1") == value


def test_reft_bad_records(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('[{"item_id": "a_0", "question": "q", "answer_value": ""}]')
    with pytest.raises(DataError, match=r"r\.json:1: empty field 'answer_value'"):
        read_reft_json(path)
    path.write_text('[{"item_id": "a_0", "question": "q", "answer_value": "1"}]')
    with pytest.raises(DataError, match=r"r\.json:1: missing field 'answer_cot'"):
        read_reft_json(path, require_cot=True)
    path.write_text('[{"item_id": "a_0", "question": "q", "answer_value": "B"}]')
    [ex] = read_reft_json(path, numeric=False)
    assert (ex.answer, ex.answer_value) == ("B", None)
    with pytest.raises(DataError, match=r"r\.json:1: gold answer 'B' is not a number"):
        read_reft_json(path)
    path.write_text('[{"item_id": "a_0",\n "question": "q" "answer_value": "1"}]')
    with pytest.raises(DataError, match=r"r\.json:2: malformed JSON"):
        read_reft_json(path)


def test_wrong_format_is_named(shared_data, tmp_path):
    with pytest.raises(DataError, match=r"svamp_nl\.json:1: (malformed JSON|expected a JSON object)"):
        read_file(shared_data / "reft" / "svamp_nl.json", "gsm8k-jsonl")
    with pytest.raises(DataError, match=r"f\.jsonl:\d+: (malformed JSON|expected a JSON list)"):
        read_file(_jsonl(tmp_path, [GOOD, GOOD]), "reft")
    with pytest.raises(DataError, match=r"f\.jsonl:1: missing field 'messages'"):
        read_file(_jsonl(tmp_path, [GOOD]), "openai")
    with pytest.raises(DataError, match=r"nope\.json:0: file not found"):
        read_file(tmp_path / "nope.json", "reft")


def test_missing_files_are_data_errors(tmp_path):
    """Every reader, and a ReFT dataset whose file is absent, names the path (was FileNotFoundError)."""
    from reftjax.data.sources import load_examples
    with pytest.raises(DataError, match=r"gone\.json:0: file not found"):
        read_reft_json(tmp_path / "gone.json")
    with pytest.raises(DataError, match=r"gone\.jsonl:0: file not found"):
        read_gsm8k_jsonl(tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match=r"gone\.jsonl:0: file not found"):
        read_openai_jsonl(tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match=r"is a folder, not a file"):
        read_reft_json(tmp_path)
    with pytest.raises(DataError, match=r"svamp_nl\.json:0: file not found"):
        load_examples("svamp-nl", local_dir=tmp_path)


def test_openai_jsonl(tmp_path):
    line = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}],
            "reference_answer": "4", "item_id": "k"}
    [ex] = read_openai_jsonl(_jsonl(tmp_path, [line]), answer_field="reference_answer")
    assert ex.messages[-1]["content"] == "2+2?" and ex.fields["reference_answer"] == "4"
    assert ex.answer_value == 4.0 and ex.item_id == "k" and ex.where.endswith("f.jsonl:1")  # (for error messages)
    blank = dict(line, messages=[line["messages"][0], {"role": "user", "content": "  "}])
    with pytest.raises(DataError, match=r"f\.jsonl:2: the last \(user\) message is empty"):
        read_openai_jsonl(_jsonl(tmp_path, [line, blank]))
    last_assistant = dict(line, messages=line["messages"] + [{"role": "assistant", "content": "x"}])
    with pytest.raises(DataError, match=r"f\.jsonl:2: the last message must be from the user"):
        read_openai_jsonl(_jsonl(tmp_path, [line, last_assistant]))
    with pytest.raises(DataError, match=r"f\.jsonl:1: gold answer 'four' is not a number.*data\.answer_field="
                                        r"'reference_answer' reads a numeric gold answer: leave it unset"):
        read_openai_jsonl(_jsonl(tmp_path, [dict(line, reference_answer="four")]),
                          answer_field="reference_answer")
    # item_id null (or absent) is numbered like a missing one; it was named "None" (session 35's list)
    no_id = {k: v for k, v in line.items() if k != "item_id"}
    ids = [e.item_id for e in read_openai_jsonl(_jsonl(tmp_path, [line, dict(line, item_id=None), no_id, line]))]
    assert ids == ["k", "item_1", "item_2", "k"]
    # a role OpenAI's chat format does not have went into the chat template as it stood (review, session 29)
    typo = dict(line, messages=[{"role": "assitant", "content": "x"}, line["messages"][1]])
    with pytest.raises(DataError, match=r"f\.jsonl:2: unknown message role 'assitant'; expected one of"):
        read_openai_jsonl(_jsonl(tmp_path, [line, typo]))
    # a dotted answer_field reads a nested field, as the graders' {{item.ref.value}} does (it was refused as missing)
    nested = dict(line, ref={"value": "12"})
    [ex] = read_openai_jsonl(_jsonl(tmp_path, [nested]), answer_field="ref.value")
    assert ex.answer == "12" and ex.answer_value == 12.0
    with pytest.raises(DataError, match=r"f\.jsonl:1: missing or empty field 'ref.nope'"):
        read_openai_jsonl(_jsonl(tmp_path, [nested]), answer_field="ref.nope")


def test_trls_conversational_prompt_is_read_as_messages_and_its_text_prompt_is_refused_with_the_fix(tmp_path):
    """TRL's conversational rows (`prompt`: a list of chat messages, other columns for the reward) were refused as
    missing 'messages' (TRL-migrant review, session 37); they read as OpenAI rows, the other fields the item's. TRL's
    standard format (a text `prompt`, no roles) is refused saying how to write it; `messages` wins over `prompt`."""
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}]
    trl = {"prompt": chat, "solution": "4"}
    [ex] = read_openai_jsonl(_jsonl(tmp_path, [trl]), answer_field="solution")
    [want] = read_openai_jsonl(_jsonl(tmp_path, [{"messages": chat, "solution": "4"}]), answer_field="solution")
    assert (ex.question, ex.messages, ex.fields, ex.answer_value) == (want.question, want.messages, want.fields, 4.0)
    assert "prompt" not in ex.fields
    both = {"messages": chat, "prompt": "a reference field", "solution": "4"}
    [ex] = read_openai_jsonl(_jsonl(tmp_path, [both]))
    assert ex.messages == want.messages and ex.fields["prompt"] == "a reference field"
    # a table with both columns has null cells: a null `messages` beside a `prompt` list reads the list (it was
    # refused as missing 'messages'; regression review)
    [ex] = read_openai_jsonl(_jsonl(tmp_path, [{"messages": None, **trl}]), answer_field="solution")
    assert ex.messages == want.messages and ex.fields == want.fields
    with pytest.raises(DataError, match=r"f\.jsonl:2: missing field 'messages': TRL's text `prompt` \(the standard "
                                        r"format\) has no roles: give it as `messages`"):
        read_openai_jsonl(_jsonl(tmp_path, [trl, {"prompt": "2+2?", "solution": "4"}]))
    with pytest.raises(DataError, match=r"f\.jsonl:1: 'prompt' must be a non-empty list"):
        read_openai_jsonl(_jsonl(tmp_path, [{"prompt": [], "solution": "4"}]))
    with pytest.raises(DataError, match=r"f\.jsonl:1: missing field 'messages' \(a list of chat messages; TRL's "
                                        r"conversational `prompt` list is read as one\)"):
        read_openai_jsonl(_jsonl(tmp_path, [{"solution": "4"}]))


def test_strip_annotations():
    assert strip_annotations("48/2 = <<48/2=24>>24 and $<<0.2*50=10>>10.") == "48/2 = 24 and $10."


def test_split_is_deterministic_and_disjoint(tmp_path):
    examples = read_gsm8k_jsonl(_jsonl(tmp_path, [dict(GOOD, question=f"q{i}") for i in range(200)]))
    train, val = train_val_split(examples, SplitConfig(0.1, seed=3))
    again = train_val_split(examples, SplitConfig(0.1, seed=3))
    other = train_val_split(examples, SplitConfig(0.1, seed=4))
    assert len(val) == 20 and len(train) == 180
    assert [e.question for e in val] == [e.question for e in again[1]]
    assert [e.question for e in val] != [e.question for e in other[1]]
    assert sorted(e.question for e in train + val) == sorted(e.question for e in examples)
    assert [e.idx for e in val] == list(range(20))
    with pytest.raises(ValueError):
        SplitConfig(1.0)
    # the share rounds to the nearest count (GSM8K's 7,473 x 0.05 = 373.65: 374): flooring it changed every run's
    # held-out split and data digests and passed the suite (mutation review, session 44)
    assert len(train_val_split(examples, SplitConfig(0.0225))[1]) == 4  # 4.5 rounds to even; 0.0225 x 200 = 4.5
    assert len(train_val_split(examples, SplitConfig(0.0275))[1]) == 6  # 5.5 -> 6
    assert len(train_val_split(examples[:19], SplitConfig(0.1))[1]) == 2  # 1.9 -> 2


def test_joined_lists_trailing_commas_and_bad_utf8_are_errors_with_a_line(tmp_path):
    one = '[\n{"item_id": "a", "question": "q", "answer_value": "1"}\n]\n'
    path = tmp_path / "two.json"
    path.write_text(one + one.replace('"a"', '"b"'))  # two files joined with cat: the second list was ignored
    with pytest.raises(DataError, match=r"two\.json:4: extra data after the JSON list"):
        read_reft_json(path)
    path.write_text(one.replace("}\n]", "},\n]"))
    with pytest.raises(DataError, match=r"two\.json:3: malformed JSON \(trailing ','\)"):
        read_reft_json(path)
    path.write_bytes(one.replace('"q"', '"\xff"').encode("latin-1"))
    with pytest.raises(DataError, match=r"two\.json:2: not valid UTF-8"):
        read_reft_json(path)
    good = json.dumps({"question": "q", "answer": "x\n#### 1"})
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes((good + "\n" + good.replace('"q"', '"\xff"') + "\n").encode("latin-1"))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_gsm8k_jsonl(bad)


def test_reft_json_with_a_byte_order_mark_says_so(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"item_id": "a", "question": "q", "answer_value": "1"}]).encode())
    with pytest.raises(DataError, match=r"bom.json:1: starts with a UTF-8 byte order mark \(BOM\)"):
        read_reft_json(path)


@pytest.mark.parametrize("text,message", [("1234,567", r"a number \(commas separate thousands only"),
                                          ("1,23", r"a number \(commas"), ("12,34,567", r"a number \(commas"),
                                          ("1e999", "finite"), ("-1e400", "finite")])
def test_gold_numbers_the_readers_refuse(text, message):
    """Commas only between groups of three digits after a head of one to three, and finite values (a mutant taking
    "1234,567" or "1,23", and one taking 1e999 as inf, passed: mutation review, session 46)."""
    with pytest.raises(DataError, match=rf"f:1: gold answer '{text}' is not {message}"):
        parse_number(text, "f:1")


def test_line_numbers_count_blank_lines_and_every_list_error_names_its_line(tmp_path):
    """A JSONL file's line numbers are the file's, blank lines included; a ReFT list's errors name the line where they
    are: two objects without a comma, a file that does not start with a list after blank lines (mutants numbering
    non-blank lines only, or naming the object's line or line 1, passed: mutation review, session 46)."""
    with pytest.raises(DataError, match=r"f\.jsonl:4: missing field 'question'"):
        read_gsm8k_jsonl(_jsonl(tmp_path, [GOOD, "", "  ", {"answer": "#### 1"}]))
    path = tmp_path / "r.json"
    path.write_text('[\n{"item_id": "a", "question": "q",\n "answer_value": "1"}\n\n {"item_id": "b"}\n]')
    with pytest.raises(DataError, match=r"r\.json:5: malformed JSON \(expected ',' or ']'\)"):
        read_reft_json(path)
    path.write_text('\n\n{"item_id": "a", "question": "q", "answer_value": "1"}\n')
    with pytest.raises(DataError, match=r"r\.json:3: expected a JSON list of objects"):
        read_reft_json(path)


def test_gold_answers_lose_their_commas_and_fields_their_spaces_in_every_format(tmp_path):
    """The gold answer text is the number without thousands commas (as GSM8K's), in ReFT files and OpenAI files'
    answer_field too, and a ReFT question is stripped (mutants keeping the commas, or the spaces, passed: mutation
    review, session 46)."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"item_id": " a_0 ", "question": "  How many?\n", "answer_value": " 1,080 "}]))
    [ex] = read_reft_json(path)
    assert (ex.item_id, ex.question, ex.answer, ex.answer_value) == ("a_0", "How many?", "1080", 1080.0)
    row = {"messages": [{"role": "user", "content": " 2+2? "}], "ref": "-1,234.5"}
    [ex] = read_openai_jsonl(_jsonl(tmp_path, [row]), answer_field="ref")
    assert (ex.question, ex.answer, ex.answer_value, ex.fields["ref"]) == ("2+2?", "-1234.5", -1234.5, "-1,234.5")


def test_openai_rows_must_end_with_a_user_turn_whatever_comes_first(tmp_path):
    """The last message must be the user's: a conversation that starts with the user's turn and ends with the
    assistant's is refused too (only one starting with a system turn was tested; mutation review, session 46)."""
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    with pytest.raises(DataError, match=r"f\.jsonl:1: the last message must be from the user"):
        read_openai_jsonl(_jsonl(tmp_path, [row]))


def test_split_parts_keep_file_order_are_reindexed_and_a_zero_fraction_holds_out_nothing(tmp_path):
    """Both parts keep the file's order and are indexed from 0, and val_fraction=0 keeps every example for training
    (mutants listing the validation part in permutation order, leaving the training part's indices, taking the last
    n_val of the permutation, whose [-0:] is all of it, or refusing 0, passed: mutation review, session 46)."""
    import numpy as np

    examples = read_gsm8k_jsonl(_jsonl(tmp_path, [dict(GOOD, question=f"q{i}") for i in range(50)]))
    train, val = train_val_split(examples, SplitConfig(0.2, seed=5))
    held = sorted(np.random.default_rng(5).permutation(50)[:10].tolist())  # the documented seeded permutation
    assert [e.question for e in val] == [f"q{i}" for i in held]
    assert [e.question for e in train] == [f"q{i}" for i in range(50) if i not in held]
    assert [e.idx for e in train] == list(range(40)) and [e.idx for e in val] == list(range(10))
    assert [e.item_id for e in val] == [f"gsm8k_file_{i}" for i in held]  # the original position stays in item_id
    train, val = train_val_split(examples, SplitConfig(0.0, seed=5))
    assert val == [] and train == examples


def test_gsm8k_ids_and_positions_count_examples_not_lines_and_the_cot_is_stripped(tmp_path):
    """A GSM8K file's item ids and indices number its examples (blank lines skipped), while `where` names the file's
    line; the chain of thought is stripped at both ends (mutants numbering ids or indices by line, or keeping the
    CoT's leading blank line, passed: mutation review, session 55)."""
    rows = ["", {"question": "Q0", "answer": "\n  3 + 4 = 7\n#### 7"}, "   ", {"question": "Q1", "answer": "x\n#### 1"}]
    a, b = read_gsm8k_jsonl(_jsonl(tmp_path, rows), "test")
    assert (a.idx, a.item_id, a.cot, b.idx, b.item_id) == (0, "gsm8k_test_0", "3 + 4 = 7", 1, "gsm8k_test_1")
    assert (a.where.rsplit(":", 1)[1], b.where.rsplit(":", 1)[1]) == ("2", "4")


@pytest.mark.parametrize("record,message", [
    ({"item_id": "a", "question": " \n ", "answer_value": "1"}, r"r\.json:1: empty field 'question'"),
    ({"item_id": "  ", "question": "q", "answer_value": "1"}, r"r\.json:1: empty field 'item_id'"),
    ({"item_id": "a", "question": "q", "answer_value": 5},
     r"r\.json:1: field 'answer_value' must be a string, got int"),
    ({"item_id": 3, "question": "q", "answer_value": "5"}, r"r\.json:1: field 'item_id' must be a string, got int"),
])
def test_reft_fields_must_be_non_blank_strings(tmp_path, record, message):
    """A blank question or item id, or a number where the authors' files hold a string, is refused naming the field
    (mutants testing emptiness without stripping, accepting an empty item id, or dropping the type check, which let
    `.strip()` fail with an AttributeError, passed: mutation review, session 55)."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(DataError, match=message):
        read_reft_json(path)


def test_reft_examples_remember_their_line_and_one_stray_character_after_the_list_is_refused(tmp_path):
    """A ReFT example's `where` is `path:line` of its object (tokenization errors name it by `Example.at`), and even
    one character after the list is extra data (mutants dropping `where`, or missing a one-character tail,
    passed: mutation review, session 55)."""
    path = tmp_path / "r.json"
    path.write_text('[\n {"item_id": "a", "question": "q", "answer_value": "1"},\n\n'
                    ' {"item_id": "b", "question": "q", "answer_value": "2"}\n]\n')
    a, b = read_reft_json(path)
    assert (a.where, b.where, b.at) == (f"{path}:2", f"{path}:4", f"{path}:4 (b)")
    path.write_text('[{"item_id": "a", "question": "q", "answer_value": "1"}]x')
    with pytest.raises(DataError, match=r"r\.json:1: extra data after the JSON list"):
        read_reft_json(path)


def test_openai_rows_read_developer_turns_numeric_answers_and_refuse_content_parts(tmp_path):
    """OpenAI's `developer` role is a known role; a JSON number in answer_field (0 included) is read, and one with
    spaces around it is stripped; a message whose content is a list of parts (multimodal) is refused; `where` names
    the line and item ids number the rows, not the lines; a field whose name holds a dot is read before a nested one.
    Mutants refusing `developer`, taking 0 as missing, keeping or refusing the spaces, letting a list of parts
    through, numbering ids by line or reading a dotted name as nested alone passed (mutation review, session 55)."""
    dev = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "1-1?"}],
           "ref": 0}
    spaced = {"messages": [{"role": "user", "content": "q"}], "ref": " 1,080 "}
    a, b = read_openai_jsonl(_jsonl(tmp_path, [dev, "", spaced]), answer_field="ref")
    assert a.messages[0]["role"] == "developer" and (a.answer, a.answer_value) == ("0", 0.0)
    assert (b.answer, b.answer_value, b.fields["ref"]) == ("1080", 1080.0, " 1,080 ")
    assert (a.where, b.at) == (f"{tmp_path / 'f.jsonl'}:1", f"{tmp_path / 'f.jsonl'}:3 (item_1)")  # (blank line 2)
    [flat] = read_openai_jsonl(_jsonl(tmp_path, [dict(spaced, **{"ref.value": "7"})]), answer_field="ref.value")
    assert flat.answer_value == 7.0
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}
    with pytest.raises(DataError, match=r"f\.jsonl:2: each message needs string 'role' and 'content'"):
        read_openai_jsonl(_jsonl(tmp_path, [spaced, parts]))


def test_a_number_error_hints_at_commas_only_when_the_text_has_one():
    """The thousands-separator hint is for answers holding a comma ("seven" got it from a mutant giving it always;
    mutation review, session 55)."""
    with pytest.raises(DataError) as err:
        parse_number("seven", "f:1")
    assert str(err.value) == "f:1: gold answer 'seven' is not a number"


def test_a_file_without_examples_is_refused_by_every_reader(tmp_path):
    """A file with no records (an empty list, blank lines only) is a DataError, not an empty dataset (a mutant
    letting one through passed: mutation review, session 55)."""
    path = tmp_path / "r.json"
    path.write_text("[\n]\n")
    with pytest.raises(DataError, match=r"r\.json:1: no examples in file"):
        read_reft_json(path)
    for reader in (read_gsm8k_jsonl, read_openai_jsonl):
        with pytest.raises(DataError, match=r"f\.jsonl:1: no examples in file"):
            reader(_jsonl(tmp_path, ["", "  "]))
