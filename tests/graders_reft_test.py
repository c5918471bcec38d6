"""ReFT answer graders against every gold answer in the shared data (and rules in isolation)."""
import functools
import json
import re

import pytest

from reftjax.graders.reft import (ReftGrader, build_program, extract_gsm8k, extract_last_number, gold_answer,
                                  process_code, reft_target)
from reftjax.graders.sandbox import SandboxConfig, SandboxPool


def _gsm8k_items(shared_data, strip_calc):
    out = []
    for name in ("train.jsonl", "test.jsonl"):
        for line in (shared_data / "gsm8k" / name).read_text().splitlines():
            row = json.loads(line)
            cot, value = row["answer"].rsplit("####", 1)
            if strip_calc:
                cot = re.sub(r"<<[^>]*>>", "", cot)
            out.append((dict(row, answer_value=value.strip().replace(",", "")), cot))
    return out


def test_svamp_gold_cot_grades_one_and_wrong_answer_does_not(shared_data):
    data = json.loads((shared_data / "reft" / "svamp_nl.json").read_text())
    grader = ReftGrader()
    texts = [reft_target(x["answer_cot"], x["answer_value"]) for x in data]
    assert [g.score for g in grader.grade_batch(data, texts)] == [1.0] * len(data)
    wrong = [dict(x, answer_value=str(float(x["answer_value"]) + 1)) for x in data]
    assert {g.score for g in grader.grade_batch(wrong, texts)} == {0.1}


@pytest.mark.parametrize("strip_calc", [False, True])
def test_gsm8k_gold_cot_grades_one_with_or_without_calculator_annotations(shared_data, strip_calc):
    pairs = _gsm8k_items(shared_data, strip_calc)
    assert len(pairs) == 8792
    items = [p[0] for p in pairs]
    texts = [reft_target(cot, item["answer_value"]) for item, cot in pairs]
    for grader in (ReftGrader(), ReftGrader(answer_field="answer")):  # raw `#### N` gold too
        assert [g.score for g in grader.grade_batch(items, texts)] == [1.0] * len(items)
    shifted = items[1:] + items[:1]
    different = [i for i, (a, b) in enumerate(zip(items, shifted))
                 if abs(float(a["answer_value"]) - float(b["answer_value"])) > 1e-2]
    grades = ReftGrader().grade_batch([shifted[i] for i in different], [texts[i] for i in different])
    assert {g.score for g in grades} == {0.1}
    native = ReftGrader(extract="gsm8k", answer_field="answer")
    assert {g.score for g in native.grade_batch(items, [it["answer"] for it in items])} == {1.0}


def test_pcot_gold_programs_execute_to_their_answer(shared_data):
    data = json.loads((shared_data / "reft" / "svamp_python_sdp.json").read_text())
    grades = ReftGrader(cot="python").grade_batch(data, [x["answer_cot"] for x in data])
    failures = [(x["item_id"], g) for x, g in zip(data, grades) if g.score != 1.0]
    assert len(data) == 3043 and failures == []


def test_reft_extraction_matches_the_authors_rules():
    g = ReftGrader()
    item = {"answer_value": "1,000"}
    assert g.grade(item, "x\nTherefore, the answer is: 1000").score == 1.0
    assert g.grade(item, "x\nTherefore, the answer is: 1000.009").score == 1.0
    assert g.grade(item, "x\nTherefore, the answer is: 1000.02").score == 0.1
    # The authors strip commas from the gold only: a comma in the prediction is unparseable.
    assert g.grade(item, "x\nTherefore, the answer is: 1,000").score == 0.0
    # Only the last trigger counts; a missing trigger means the whole text must be a number.
    assert g.grade(item, "\nTherefore, the answer is: 1000\nTherefore, the answer is: 7").score == 0.1
    assert g.grade(item, "the answer is 1000").score == 0.0
    assert g.grade(item, " 1000 ").score == 1.0
    fallback = ReftGrader(fallback="last_number")
    assert fallback.grade(item, "so we get $1,000.").score == 1.0
    mathqa = ReftGrader(answer_type="mathqa")
    assert mathqa.grade({"answer_value": "C"}, "y\nTherefore, the answer is: 'c'").score == 1.0
    assert mathqa.grade({"answer_value": "C"}, "y\nTherefore, the answer is: d").score == 0.1


def test_gsm8k_native_and_last_number_rules():
    assert extract_gsm8k("blah\n#### $1,234.00") == "1234"
    assert extract_gsm8k("#### 50%") == "50"
    assert extract_gsm8k("#### -3.50.") == "-3.50"
    assert extract_gsm8k("no marker 5") is None
    assert extract_gsm8k("#### 3\nWait, let me redo it.\n#### 7") == "7"  # the last marker's number (mutation review)
    assert extract_gsm8k("#### 3\n##### 7") == "7"
    assert extract_last_number("a 3 b 4,500.0 c.") == "4500"
    assert extract_last_number("none") is None


def test_program_processing_matches_the_authors():
    code = "def solution():\n    x = 1\n    sys.exit(1)\n\n    return 2\nprint(3)"
    assert process_code(code) == "import math\nimport sympy\ndef solution():\n    x = 1\n    print(1)"
    item = {"question": " q? "}
    assert build_program(item, "\n    return 1") == 'def solution():\n    """q?"""\n    return 1'
    assert build_program(item, "def solution():\n    return 1\n") == "def solution():\n    return 1"  # a whole program
    # the header + the completion verbatim, as the ReFT authors run it (a newline was put in between until session 29)
    gold = {"question": "q", "answer_value": "203"}
    tails = ["\n    return 29 * 7", "    return 29 * 7", " \n    return 29 * 7", "; return 29 * 7",
             "\t\n    return 29 * 7"]
    assert [g.score for g in ReftGrader(cot="python").grade_batch([gold] * 5, tails)] == [1.0, 0.0, 1.0, 1.0, 1.0]
    grades = ReftGrader(cot="python").grade_batch(
        [{"question": "q", "answer_value": "2"}] * 4,
        ["\n    return 2", "\n    return 3", "\n    return 'two'", "\n    return helper()"])
    assert [g.score for g in grades] == [1.0, 0.1, 0.0, 0.0]
    assert "NameError" in grades[3].error


def test_bad_config_and_bad_item_are_reported():
    with pytest.raises(ValueError, match="cot"):
        ReftGrader(cot="java")
    with pytest.raises(KeyError, match="answer_value"):
        ReftGrader().validate({"answer": "3"})
    with pytest.raises(ValueError, match="not a number"):
        ReftGrader().validate({"answer_value": "three"})


def test_number_rules_do_not_read_a_subtraction_as_a_minus_sign_and_read_fractions():
    assert extract_last_number("She has 12 - 7") == "7"
    assert extract_last_number("x = 5-3") == "3"
    assert extract_last_number("(2)-3 apples") == "3"
    assert extract_last_number("it is -3.") == "-3"
    assert extract_last_number("The answer is 1/2.") == "0.5"
    assert extract_gsm8k("#### 1/2") == "0.5"
    assert extract_gsm8k("#### -$5") == "-5"
    g = ReftGrader(extract="gsm8k")
    assert g.grade({"answer_value": "0.5"}, "#### 1/2").score == 1.0
    assert g.grade({"answer_value": "1"}, "#### 1/2").score == 0.1


def test_a_partial_reward_of_one_is_refused():
    # evaluation counts a score of 1 as correct: partial_reward=1 would make every wrong answer correct
    with pytest.raises(ValueError, match="partial_reward"):
        ReftGrader(partial_reward=1.0)


def test_pcot_results_vote_by_value_and_non_answers_do_not_vote():
    from reftjax.evaluate import majority_correct

    item = {"question": "q", "answer_value": "2.5"}
    progs = ["\n    return sympy.Rational(5, 2)"] * 2 + ["\n    return 5 / 2"] * 2 + ["\n    return 3"] * 3
    grades = ReftGrader(cot="python").grade_batch([item] * 7, progs)
    assert [g.score for g in grades] == [1.0] * 4 + [0.1] * 3
    assert majority_correct(grades)  # four votes for 2.5 (two of them written 5/2) against three for 3
    mathqa = {"question": "q", "answer_value": "c"}
    for cot, texts in (("python", ["\n    return None"] * 3 + ["\n    return 'c'"] * 2),
                       ("nl", ["I think so"] * 3 + ["x\nTherefore, the answer is: c"] * 2)):
        grades = ReftGrader(cot=cot, answer_type="mathqa").grade_batch([mathqa] * 5, texts)
        assert [g.score for g in grades] == [0.1] * 3 + [1.0] * 2  # the authors' rewards
        assert majority_correct(grades)  # only option letters vote


def test_infinite_answers_vote_by_value():
    """"inf" and "Infinity" are one value, as in the authors' float-keyed vote; they voted apart, so two 7s tied
    them and won (first seen)."""
    from reftjax.evaluate import majority_correct

    grades = ReftGrader().grade_batch([{"answer_value": "7"}] * 6, [
        f"x\nTherefore, the answer is: {v}" for v in ["7", "7", "inf", "Infinity", "-inf", "-Infinity"]])
    assert [g.score for g in grades] == [1.0] * 2 + [0.1] * 4
    assert not majority_correct(grades[:4] + grades[2:3])  # inf x3 against 7 x2
    assert majority_correct(grades)  # inf x2, -inf x2 and 7 x2: the first seen wins
    assert not majority_correct(grades[2:4] + grades[:2], tol=1e-2)


def test_a_vote_is_right_only_when_its_answer_is_not_when_a_near_value_in_its_group_is():
    """With eval.voting_tol=0.01, values within the grading tolerance of each other vote as one group, and the
    group's answer is its most-voted value. Its correctness was an OR over the members: one right 42.009 made three
    wrong 42.017s (gold 42) a right vote, in either order (helper review)."""
    from reftjax.evaluate import majority_correct

    grades = ReftGrader().grade_batch([{"answer_value": "42"}] * 7, [
        f"x\nTherefore, the answer is: {v}" for v in ["42.009"] + ["42.017"] * 3 + ["7"] * 3])
    assert [g.score for g in grades] == [1.0] + [0.1] * 6
    vote = functools.partial(majority_correct, tol=1e-2)  # the grouping (eval.voting_tol; by default equal values)
    assert not vote(grades) and not vote(grades[1:] + grades[:1])
    # the group's right value wins inside it: 42.009 x2 against 42.017 x1, the group against 7 x2
    mixed = grades[:1] * 2 + grades[1:2] + grades[4:6]
    assert vote(mixed) and vote(mixed[::-1])
    # verifier weights decide inside the group as they decide between groups
    assert not vote(mixed, [0.1, 0.1, 0.9, 0.2, 0.2])


@pytest.mark.parametrize("cfg, message", [
    # answer_field 3 built, then failed as an AttributeError traceback once the model and data had loaded (review)
    ({"type": "reft", "answer_field": 3}, "grader.answer_field: must be a string, got 3"),
    ({"type": "reft", "cot": "python", "question_field": ["q"]}, "grader.question_field: must be a string"),
    ({"type": "gsm8k", "fallback": None}, "grader.fallback: must be a string, got None"),
    ({"type": "reft", "cot": 1}, "grader.cot: must be a string, got 1"),
    # "0.1" failed comparing a string with numbers
    ({"type": "reft", "partial_reward": "0.1"}, r"grader.partial_reward: must be a number in \[0, 1\) .*got '0.1'"),
    ({"type": "reft", "partial_reward": True}, r"grader.partial_reward: must be a number in \[0, 1\)"),
    ({"type": "reft", "partial_reward": -0.1}, r"grader.partial_reward: must be a number in \[0, 1\)"),
    ({"type": "multi", "graders": {"r": {"type": "reft", "partial_reward": float("nan")}}, "calculate_output": "r"},
     r"grader.graders.r.partial_reward: must be a number"),
])
def test_a_reft_grader_field_of_the_wrong_type_is_refused_naming_it(cfg, message):
    from reftjax.graders.build import ConfigError, build_grader

    with pytest.raises(ConfigError, match=message):
        build_grader(cfg)
    assert build_grader({"type": "reft", "partial_reward": 0}).partial_reward == 0


def test_a_reft_grader_built_directly_refuses_fields_of_the_wrong_type():
    for kwargs, message in (({"answer_field": 3}, "answer_field must be a string, got 3"),
                            ({"partial_reward": "0.1"}, r"partial_reward must be a number in \[0, 1\).*got '0.1'")):
        with pytest.raises(ValueError, match=message):
            ReftGrader(**kwargs)


def test_the_tolerance_is_inclusive_and_gold_commas_are_read_when_validating():
    """The authors' numeric check is `abs(pred - gold) <= 1e-2`: 0.01 against a gold of 0 (exact in floating point)
    is right; a gold with thousands commas is a number to `validate` as it is to grading (mutation review, s46)."""
    g = ReftGrader()
    assert [g.grade({"answer_value": "0"}, f"x\nTherefore, the answer is: {v}").score
            for v in ("0.01", "-0.01", "0.0101")] == [1.0, 1.0, 0.1]
    g.validate({"answer_value": "1,000"})
    assert g.grade({"answer_value": "1,000"}, "x\nTherefore, the answer is: 1000 \n").extracted == "1000"


def test_mathqa_options_and_the_last_number_fallback():
    """MathQA answers are option letters: a longer text is extracted (0.1, as the authors reward it) but is no
    answer that votes; the last-number fallback is for numeric answers only (it read "5" out of a MathQA reply whose
    option "c" was right)."""
    mathqa = ReftGrader(answer_type="mathqa", fallback="last_number")
    right = mathqa.grade({"answer_value": "C"}, "5 apples\nTherefore, the answer is: c")
    assert (right.score, right.extracted, right.error) == (1.0, "c", None)
    wordy = mathqa.grade({"answer_value": "C"}, "5 apples\nTherefore, the answer is: abc")
    assert wordy.score == 0.1 and wordy.error == "not an option letter: 'abc'"
    assert mathqa.grade({"answer_value": "C"}, "x\nTherefore, the answer is: d").error is None


def test_gsm8k_rule_edge_cases():
    """Thousands groups of any length, a normalised `-3.0` and `$ 5`, a zero denominator (not a number, the
    completion's 0, not a grader error), and the number on the last marker's line only (a `#### Conclusion`
    heading with no number has no answer, though the next line has one)."""
    from reftjax.graders.base import is_fault

    assert extract_gsm8k("#### 1,234,567") == "1234567" and extract_last_number("so 1,234,567 apples") == "1234567"
    assert extract_gsm8k("#### -3.0") == "-3" and extract_gsm8k("#### $ 5") == "5"
    assert extract_gsm8k("#### 3/0") == "3/0"
    grade = ReftGrader(extract="gsm8k").grade({"answer_value": "3"}, "#### 3/0")
    assert grade.score == 0.0 and not is_fault(grade) and "not a number" in grade.error
    assert extract_gsm8k("Tom has 3 apples.\n#### Conclusion\nHe has 7 apples.") is None


def test_a_blank_line_of_spaces_ends_the_program_as_the_authors_process_it():
    code = "def solution():\n    x = 1\n    \n    return 2"
    assert process_code(code) == "import math\nimport sympy\ndef solution():\n    x = 1"


def test_the_trigger_the_partial_reward_and_the_mathqa_quotes_are_the_authors():
    """The trigger is `\\nTherefore, the answer is: ` (newline included: without it the whole text is read, a 0),
    a wrong answer earns `partial_reward` whatever it is set to, both quote kinds leave a MathQA answer, an empty one
    is extracted (0.1, as the authors score `""`) but no option letter, and with the `#### N` rule nothing extracted
    is a 0 (mutants dropping the newline, hard-coding 0.1, keeping double quotes, taking an empty text for an option
    or scoring "nothing" 0.1 passed: mutation review, session 55)."""
    assert reft_target(" so 2 + 3 \n", " 5 ") == "so 2 + 3\nTherefore, the answer is: 5"
    item = {"answer_value": "5"}
    assert ReftGrader().grade(item, "so Therefore, the answer is: 5").score == 0.0
    assert [ReftGrader(partial_reward=0.3).grade(item, t).score for t in
            ("x\nTherefore, the answer is: 6", "x\nTherefore, the answer is: 5", "x\nTherefore, the answer is: ?")] \
        == [0.3, 1.0, 0.0]
    mathqa = ReftGrader(answer_type="mathqa")
    assert mathqa.grade({"answer_value": "c"}, 'x\nTherefore, the answer is: "C"').score == 1.0
    assert ReftGrader(answer_type="mathqa", partial_reward=0.3).grade({"answer_value": "c"},
                                                                      "x\nTherefore, the answer is: d").score == 0.3
    empty = mathqa.grade({"answer_value": "c"}, "x\nTherefore, the answer is: ")
    assert empty.score == 0.1 and empty.error == "not an option letter: ''"
    native = ReftGrader(extract="gsm8k", answer_type="mathqa")
    assert native.grade({"answer_value": "c"}, "the answer is c").score == 0.0
    # the last-number fallback after the `#### N` rule found no marker: neither rule raises on the other's None
    fallback = ReftGrader(extract="gsm8k", fallback="last_number")
    assert [fallback.grade(item, t).score for t in ("he has 5 apples", "no number", "#### 4")] == [1.0, 0.0, 0.1]
    assert gold_answer({"answer": "3 #### 4 = 7\n#### 9 "}, "answer") == "9"  # raw GSM8K gold: the last marker


def test_pcot_programs_run_as_the_authors_exec_them_and_a_sandbox_failure_is_the_graders():
    """The authors `exec(code, globals, locals)` with separate dicts: a top-level helper lands in the locals, which
    `solution()` cannot see (a NameError, 0); a text opening with spaces before `def solution` goes after the header
    as it stands (a syntax error, 0); a result that is no number scores 0 with its text recorded, a crash is the
    program's 0, and a pool that cannot run programs is the grader's fault; `validate` asks for the question of a
    P-CoT item; one default pool serves each limit (mutants running one dict, reading ` def solution` as a whole
    program, swapping crash and sandbox failure, dropping the recorded text or the check, or starting a pool per call
    passed: mutation review, session 55)."""
    from reftjax.graders.base import is_fault
    from reftjax.graders.reft import default_pool

    item = {"question": "q", "answer_value": "2"}
    texts = ["\n    return helper()\ndef helper():\n    return 2", " def solution():\n    return 2",
             "\n    return 'two'", "\n    import os\n    os._exit(0)"]
    grades = ReftGrader(cot="python").grade_batch([item] * 4, texts)
    assert [g.score for g in grades] == [0.0] * 4, grades
    assert "NameError" in grades[0].error and "SyntaxError" in grades[1].error, grades
    assert grades[2].extracted == "two" and grades[3].error.startswith("crashed: ")
    assert not any(is_fault(g) for g in grades)
    with SandboxPool(SandboxConfig(workers=1, timeout_s=1.0, preimport=("asyncio",))) as broken:
        [failed] = ReftGrader(cot="python", pool=broken).grade_batch([item], ["\n    return 2"])
    assert failed.score == 0.0 and is_fault(failed) and failed.error.startswith("sandbox_failure: "), failed
    with pytest.raises(KeyError, match="question"):
        ReftGrader(cot="python").validate({"answer_value": "2"})
    assert default_pool() is default_pool() and default_pool(SandboxConfig(timeout_s=3.0)) is not default_pool()
