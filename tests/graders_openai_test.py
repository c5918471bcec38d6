"""Config-driven graders, their validation and the CLI."""
import json
import math
import random
import re
import subprocess
import sys

import pytest

from reftjax.graders.base import is_fault
from reftjax.graders.build import ConfigError, build_grader, validate_grader
from reftjax.graders.openai import bleu, gleu, render, rouge

ITEM = {"answer": "Paris", "meta": {"unit": "km"}}


def _one(cfg, text, item=ITEM):
    return build_grader(cfg).grade_batch([item], [text])[0]


def test_string_check_operations():
    base = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
    assert _one({**base, "operation": "eq"}, "Paris").score == 1.0
    assert _one({**base, "operation": "eq"}, "paris").score == 0.0
    assert _one({**base, "operation": "ne"}, "Rome").score == 1.0
    assert _one({**base, "operation": "like"}, "It is Paris.").score == 1.0
    assert _one({**base, "operation": "like"}, "It is paris.").score == 0.0
    assert _one({**base, "operation": "ilike"}, "It is PARIS.").score == 1.0


def test_templates_nested_json_and_missing_fields():
    sample = {"output_text": '{"x": {"y": 3}}', "output_json": {"x": {"y": 3}}}
    assert render("{{ sample.output_json.x.y }} {{item.meta.unit}}", sample, ITEM) == "3 km"
    with pytest.raises(KeyError, match="item.nope"):
        render("{{item.nope}}", sample, ITEM)
    cfg = {"type": "string_check", "input": "{{sample.output_json.city}}",
           "reference": "{{item.answer}}", "operation": "eq"}
    assert _one(cfg, '{"city": "Paris"}').score == 1.0
    assert "not found" in _one(cfg, "not json").error


def test_text_similarity_against_independent_implementations():
    fuzzy = {"type": "text_similarity", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}
    assert _one(fuzzy, "Paris").score == 1.0 and 0.0 < _one(fuzzy, "Pariss").score < 1.0
    cand, ref = "the cat sat on the mat today", "the cat sat on a mat today"
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL"])
    expected = scorer.score(ref, cand)
    assert rouge(cand, ref, "1") == pytest.approx(expected["rouge1"].fmeasure)
    assert rouge(cand, ref, "2") == pytest.approx(expected["rouge2"].fmeasure)
    assert rouge(cand, ref, "l") == pytest.approx(expected["rougeL"].fmeasure)
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    from nltk.tokenize import wordpunct_tokenize

    smooth = nltk_bleu.SmoothingFunction().method2  # add-one for n > 1, as ours
    # punctuation is its own token (whitespace tokens scored "Paris." against "Paris" 0; review, session 27)
    for cand, ref in ((cand, ref), ("The cat, it sat on the mat today!", "the cat sat on the mat today."),
                      ("Paris, London, Berlin and Rome.", "Paris London Berlin and Rome"),
                      # shorter than its reference: the brevity penalty (without it, every n-gram of "the cat sat on"
                      # matches and it scored 1: a policy could learn to answer with a prefix; mutation review, s44)
                      ("the cat sat on", "the cat sat on the mat today.")):
        assert bleu(cand, ref) == pytest.approx(nltk_bleu.sentence_bleu(
            [wordpunct_tokenize(ref)], wordpunct_tokenize(cand), smoothing_function=smooth))
        assert bleu(ref, ref) == pytest.approx(1.0)
    assert bleu("Paris.", "Paris") > 0.5


def test_gleu_matches_nltk_sentence_gleu():
    """`gleu` is nltk's `sentence_gleu` (1- to 4-grams, min of precision and recall) on `wordpunct_tokenize` tokens,
    case kept: random texts from a small vocabulary (repeated words, punctuation, empty sides) and a few by hand."""
    gleu_score = pytest.importorskip("nltk.translate.gleu_score")
    from nltk.tokenize import wordpunct_tokenize

    rng = random.Random(0)
    vocab = ["the", "The", "cat", "sat", "on", "mat", ".", ",", "!", "42", "x-ray", "it's", "Paris"]
    pairs = [(" ".join(rng.choices(vocab, k=rng.randint(0, 12))), " ".join(rng.choices(vocab, k=rng.randint(0, 12))))
             for _ in range(300)]
    pairs += [("Paris", "Paris"), ("Paris.", "Paris"), ("", ""), ("the cat sat", "the cat sat on the mat"),
              ("the the the the", "the cat"), ("The cat, it sat!", "the cat sat.")]
    for cand, ref in pairs:
        expected = gleu_score.sentence_gleu([wordpunct_tokenize(ref)], wordpunct_tokenize(cand))
        assert gleu(cand, ref) == pytest.approx(expected, abs=1e-12), (cand, ref)
    assert sum(0 < gleu(c, r) < 1 for c, r in pairs) > 200  # the random pairs are mostly partial matches
    cfg = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
           "evaluation_metric": "gleu"}
    validate_grader(cfg, ITEM)  # accepted (it was refused as unsupported before session 60)
    # "Paris , France": 6 n-grams, one shared with "Paris"
    assert _one(cfg, "Paris").score == 1.0 and _one(cfg, "Paris, France").score == pytest.approx(1 / 6)


def test_python_math_equiv_and_multi():
    python = {"type": "python",
              "source": "def grade(sample, item):\n    return float(item['answer'] in sample['output_text'])"}
    math_eq = {"type": "math_equiv", "input": "{{sample.output_text}}", "reference": "{{item.expr}}"}
    multi = {"type": "multi", "calculate_output": "0.5 * py + 0.5 * eq",
             "graders": {"py": python, "eq": math_eq}}
    item = {"answer": "x", "expr": "2*(x+1)"}
    grades = build_grader(multi).grade_batch([item] * 3, ["2x + 2", "x**2", "(("])
    assert [g.score for g in grades] == [1.0, 0.5, 0.0]
    assert grades[0].details["scores"] == {"py": 1.0, "eq": 1.0}
    # the vote goes by an answer, never by a score: math_equiv records the answer it compared (it recorded "1.0"),
    # a python grader only its score, so a multi grader votes by its math_equiv part although python comes first
    assert [g.extracted for g in grades[:2]] == ["2x + 2", "x**2"]
    assert [g.extracted for g in build_grader(math_eq).grade_batch([item] * 2, ["2x + 2", " x**2 "])] == ["2x + 2",
                                                                                                       "x**2"]
    assert not build_grader(python).votes_on_answer and build_grader(math_eq).votes_on_answer
    assert build_grader(multi).votes_on_answer
    hostile = {"type": "python", "source": "def grade(sample, item):\n    import os\n    os.fork()\n    return 1"}
    g = _one(hostile, "x")
    assert g.score == 0.0 and "os.fork" in g.error


def test_math_equiv_refuses_a_prediction_that_is_code():
    """sympy's parse_expr evals its text, and the job holding the prediction also holds the gold: a completion that
    reached the caller's frame scored 1.0 against any gold (helper review). Only numbers, arithmetic, brackets, math
    functions and names that become symbols get to the parser."""
    cfg = {"type": "math_equiv", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
    grader = build_grader(cfg)
    items = [{"answer": "17/3"}, {"answer": "2*sqrt(2)"}, {"answer": "1234567"}]
    for code in ("S(__import__('sys')._getframe(3).f_locals['gold'])", "eval(chr(49))", "S(open(chr(47)))",
                 "pi.evalf()", "lambda: 1", "[x for x in y]", "x if y else z", "globals()", "sympify(x)",
                 "\uff45\uff56\uff41\uff4c(\uff43\uff48\uff52(49))", "x.__class__", "_x", "Symbol(x)"):
        grades = grader.grade_batch(items, [code] * 3)
        assert [g.score for g in grades] == [0.0] * 3, code
        assert all("not a math expression" in g.error for g in grades), (code, grades[0].error)
    honest = ["5", "sqrt(8)", "1,234,567", "2x + 2", "3! - 1/3"]
    assert [g.score for g in grader.grade_batch(items + [{"answer": "2*(x+1)"}, items[0]], honest)] == \
        [0.0, 1.0, 1.0, 1.0, 1.0]
    # what parsed before the fix still does (regression review): exponents, unicode and subscripted names, special
    # functions
    pairs = [("1E1", "10"), ("2.5E1", "25"), ("1.e5", "100000"), ("2\u03c0", "2*\u03c0"), ("x_1 + 1", "1 + x_1"),
             ("gamma(5)", "24"), ("zeta(2)", "pi**2/6"), ("sign(-2)", "-1"), ("acot(1)", "pi/4"), ("round(2.4)", "2"),
             ("GoldenRatio", "(1 + sqrt(5))/2"), ("ln(E)", "1"), ("xy", "x*y"), (".5e1", "5")]
    grades = grader.grade_batch([{"answer": g} for _, g in pairs], [p for p, _ in pairs])
    assert [(g.score, g.error) for g in grades] == [(1.0, None)] * len(pairs)


@pytest.mark.parametrize("cfg, message", [
    ({"type": "string_check", "input": "a", "reference": "b"}, "missing \\['operation'\\]"),
    ({"type": "string_check", "input": "a", "reference": "b", "operation": "regex"}, "operation"),
    ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "ter"},
     "not supported"),
    ({"type": "python", "source": "def grade(:"}, "does not parse"),
    ({"type": "python", "source": "def score(sample, item):\n    return 1"}, "must define grade"),
    # a grade() that cannot take (sample, item) failed every sample as a grader error (session 27's list)
    ({"type": "python", "source": "def grade(sample):\n    return 1"}, "line 1: grade\\(\\) must take two arguments"),
    ({"type": "python", "source": "import math\n\ndef grade(s, i, ref):\n    return 1"}, "line 3: grade\\(\\) must"),
    ({"type": "python", "source": "def grade(s, i, *, k):\n    return 1"}, "must take two arguments"),
    ({"type": "python", "source": "def grade(s, i):\n    return 1\ndef grade(s):\n    return 1"}, "line 3: grade"),
    ({"type": "score_model", "model": "x", "input": []}, r"grader\.input: must be a non-empty list of messages"),
    ({"type": "multi", "graders": {"a": {"type": "gsm8k"}}, "calculate_output": "a + b"},
     "unknown names"),
    ({"type": "multi", "graders": {"a": {"type": "gsm8k"}}, "calculate_output": "__import__('os')"},
     "grader.calculate_output"),
    ({"type": "multi", "graders": {"a": {"type": "nope"}}, "calculate_output": "a"},
     "grader.graders.a: unknown grader type"),
    ({"type": "multi", "graders": {"a": {"type": "gsm8k"}}, "calculate_output": 1}, "must be a formula string"),
    # the formula was checked by evaluating it once at 0.5: what followed a raising part went unchecked and failed
    # every sample (a typo), or raised out of grade_batch (max of one number: TypeError; review, session 27)
    ({"type": "multi", "graders": {"a": {"type": "gsm8k"}, "b": {"type": "gsm8k"}},
      "calculate_output": "(a + b) / (a - b) + typo"}, "unknown name 'typo'"),
    ({"type": "multi", "graders": {"a": {"type": "gsm8k"}, "b": {"type": "gsm8k"}},
      "calculate_output": "1 / (a - b) + max(a)"}, "max\\(\\) takes 2 or more arguments"),
    ({"type": "multi", "graders": {"a": {"type": "gsm8k"}}, "calculate_output": "a % 2"}, "unsupported expression"),
    ({"type": "multi", "graders": {"a": {"type": "gsm8k"}}, "calculate_output": "sqrt(a, 2)"}, "sqrt\\(\\) takes 1"),
    # OpenAI's min/max take two or more numbers, and no keywords (a `key=` was accepted and then ignored); `not a` is
    # Python's, not OpenAI's (mutation review, session 55)
    ({"type": "multi", "graders": {"a": {"type": "gsm8k"}}, "calculate_output": "min(a)"},
     "min\\(\\) takes 2 or more"),
    ({"type": "multi", "graders": {"a": {"type": "gsm8k"}}, "calculate_output": "max(a, a, key=abs)"},
     "max\\(\\) takes 2 or more arguments, got 'max\\(a, a, key=abs\\)'"),
    ({"type": "multi", "graders": {"a": {"type": "gsm8k"}}, "calculate_output": "not a"},
     "unsupported expression 'not a'"),
    ({"type": "multi", "graders": {}, "calculate_output": "1"}, "grader.graders: must be a non-empty object"),
    ({"type": "reft", "cot": "java"}, "cot must be one of"),
    ({"type": "reft", "answer_feld": "x"}, "unknown keys"),
    # a template that is not a string passed validation and failed at the first grade as a TypeError (helper review)
    ({"type": "string_check", "input": 3, "reference": "{{item.answer}}", "operation": "eq"},
     "grader.input: must be a template string"),
    ({"type": "multi", "graders": {"a": {"type": "text_similarity", "input": "{{sample.output_text}}",
                                         "reference": ["x"], "evaluation_metric": "bleu"}}, "calculate_output": "a"},
     "grader.graders.a.reference: must be a template string"),
    # what a template needs no item for is checked when the grader is built: `validate` without samples said ok to
    # {{sample.output_txt}}, and with samples blamed the samples file's line 1 (review, session 29)
    ({"type": "string_check", "input": "{{sample.output_txt}}", "reference": "x", "operation": "eq"},
     "grader.input: template field {{sample.output_txt}} must be item"),
    ({"type": "multi", "graders": {"a": {"type": "math_equiv", "input": "{{sample.output_text}}",
                                         "reference": "{{item.an-swer}}"}}, "calculate_output": "a"},
     "grader.graders.a.reference: template field {{item.an-swer}} is not a dotted name"),
])
def test_malformed_configs_fail_clearly(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_grader(cfg)


@pytest.mark.parametrize("signature", ["sample, item", "*args", "s, i=None, extra=1", "s, /, i, *, k=2", "s, *rest"])
def test_python_graders_that_can_take_sample_and_item_are_accepted(signature):
    assert build_grader({"type": "python", "source": f"def grade({signature}):\n    return 1"}).entry == "grade"


@pytest.mark.parametrize("source", [
    "def deco(f):\n    def w(s, i):\n        return f(s, i, 1)\n    return w\n@deco\ndef grade(s, i, r):\n    return r",
    "import functools\ndef grade(s, i, scale):\n    return scale\ngrade = functools.partial(grade, scale=1.0)",
    "def grade(s):\n    return 1\nif True:\n    def grade(s, i):\n        return 1",
    # an import that rebinds the name, as a reassignment does (mutation review, session 55)
    "def grade(s):\n    return 1\nfrom operator import add as grade",
])
def test_a_grade_name_bound_otherwise_than_by_plain_defs_is_not_judged_by_a_def(source):
    """The arguments check refused a decorated grade, a partial of it and a def under `if` that are called as
    grade(sample, item) (regression review, session 28): only plain top-level defs are checked."""
    assert build_grader({"type": "python", "source": source}).entry == "grade"


def test_validation_against_a_sample_item_names_missing_fields():
    cfg = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answr}}",
           "operation": "eq"}
    with pytest.raises(ConfigError, match="item.answr"):
        validate_grader(cfg, ITEM)
    with pytest.raises(ConfigError, match="answer_value"):
        validate_grader({"type": "reft"}, ITEM)
    validate_grader({"type": "gsm8k"}, {"answer": "so 3\n#### 3"})
    # misspelt sample fields and names the template syntax cannot read fail here, not as a silent 0 per sample
    for bad, msg in (("{{sample.output_txt}}", "sample.output_txt"), ("{{item.final-answer}}", "item.final-answer")):
        with pytest.raises(ConfigError, match=msg):
            validate_grader({**cfg, "reference": bad}, ITEM)
    validate_grader({**cfg, "reference": "{{sample.output_json.x}}"}, ITEM)


def test_multi_scores_a_failing_part_or_a_complex_result_zero_without_failing_the_batch():
    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    missing = {**eq, "reference": "{{item.other}}"}  # a field some items lack: that part errors
    grader = build_grader({"type": "multi", "graders": {"a": eq, "b": missing}, "calculate_output": "1 - b"})
    good, bad = grader.grade_batch([{"answer": "x", "other": "y"}, {"answer": "x"}], ["x", "x"])
    assert (good.score, good.error) == (1.0, None)
    assert bad.score == 0.0 and bad.error.startswith("b: ") and "item.other" in bad.error
    # a negative base to a fractional power is complex in Python: that row scores 0, the others still count
    root = build_grader({"type": "multi", "graders": {"a": eq}, "calculate_output": "(a - 0.75) ** 0.5"})
    hit, miss = root.grade_batch([{"answer": "x"}] * 2, ["x", "no"])
    assert hit.score == pytest.approx(0.5) and hit.error is None
    assert miss.score == 0.0 and "not a real number" in miss.error
    build_grader({"type": "multi", "graders": {"a": eq, "b": eq}, "calculate_output": "a / (1 - 2 * b)"})  # 0 at b=.5


def test_multi_formulas_take_openais_operators_and_functions():
    """OpenAI's calculate_output: + - * / ^ (power) and min, max, abs, floor, ceil, exp, sqrt, log. `^` and the last
    five were refused; `^` binds as a power does (`a ^ 2 + 1`, where Python's xor would take 2 + 1 first). A
    function's domain error on a sample (log 0) is a grader error that scores 0, not a crash."""
    from reftjax.graders.base import is_fault

    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    sim = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
           "evaluation_metric": "fuzzy_match"}
    item, text = {"answer": "Paris"}, "Pariss"  # a = 0, b = fuzz.ratio = 10/11
    b = 10 / 11
    for formula, want in (("b ^ 2 + 1", b ** 2 + 1), ("sqrt(b) / 2", b ** 0.5 / 2), ("floor(b) + ceil(b) / 4", 0.25),
                          ("exp(a - 1)", math.exp(-1)), ("log(1 + b)", math.log(1 + b)), ("-2 ^ 2 + 5", 1.0),
                          ("min(a, b, 0.5) + max(b, 0.1) / 2 + abs(a - b) / 4", b / 2 + b / 4)):
        g = build_grader({"type": "multi", "graders": {"a": eq, "b": sim}, "calculate_output": formula})
        got = g.grade_batch([item], [text])[0]
        assert got.error is None and got.score == pytest.approx(min(1.0, want)), formula
    bad = build_grader({"type": "multi", "graders": {"a": eq, "b": sim}, "calculate_output": "log(a) + sqrt(a - b)"})
    got = bad.grade_batch([item], [text])[0]
    assert got.score == 0.0 and is_fault(got) and "calculate_output: ValueError" in got.error


def test_a_multi_formula_that_can_leave_0_1_is_named_with_where_it_does():
    """Scores are clipped to [0, 1] per sample, silently: TRL's `0.5 * fmt + 1.0 * cor` scored a correct answer 1
    with or without the format (review, session 37). `reach_warnings` names each multi grader whose formula leaves
    [0, 1] on sub-scores in [0, 1], nested ones by their config path, and nothing for formulas that stay inside."""
    from reftjax.graders.build import reach_warnings

    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}

    def warned(formula, names=("fmt", "cor")):
        return reach_warnings(build_grader({"type": "multi", "graders": dict.fromkeys(names, eq),
                                            "calculate_output": formula}))

    (w,) = warned("0.5 * fmt + 1.0 * cor")
    assert w.startswith("grader: calculate_output '0.5 * fmt + 1.0 * cor' reaches 1.5 (at fmt=1, cor=1)"), w
    assert "above 1 tie at 1" in w
    (w,) = warned("cor - 1", ("cor",))
    assert "reaches -1 (at cor=0)" in w and "below 0 tie at 0" in w
    (w,) = warned("fmt / cor")  # 2 at fmt=1, cor=0.5 (cor=0 divides by zero there: skipped, not a crash)
    assert "reaches 2 (at fmt=1, cor=0.5)" in w
    for formula in ("0.5 * fmt + 0.5 * cor", "(0.5 * fmt + cor) / 1.5", "fmt * cor", "min(fmt, cor)", "max(fmt, cor)",
                    "1 - fmt", "fmt ^ 2", "abs(fmt - cor)", "sqrt(fmt) * 0.9 + 0.1 * cor"):
        assert warned(formula) == [], formula
    # regression review: a complex value inside min/floor crashed the check (TypeError) at every run's start; the
    # formula fails where a < 0.5 and stays in [0, 1] elsewhere
    assert warned("min(1, (fmt - 0.5) ** 0.5)") == warned("floor((fmt - 0.5) ** 0.5 + 0.5)") == []
    (w,) = warned("fmt / (cor - cor)")  # fails at every point: said, not passed over
    assert "fails (or is not a real number) at every point tried" in w, w
    many = [f"g{i}" for i in range(13)]  # more graders than the corners can cover: drawn corners, all ones among them
    (w,) = warned(" + ".join(many), many)
    assert "reaches 13 (at g0=1," in w, w
    assert warned(" + ".join(f"{1 / 13} * {n}" for n in many), many) == []
    inner = {"type": "multi", "graders": {"a": eq, "b": eq}, "calculate_output": "a + b"}
    nested = build_grader({"type": "multi", "graders": {"inner": inner, "c": eq},
                           "calculate_output": "0.5 * inner + 0.5 * c"})
    (w,) = reach_warnings(nested)
    assert w.startswith("grader.graders.inner: calculate_output 'a + b' reaches 2 (at a=1, b=1)"), w
    assert reach_warnings(build_grader(eq)) == []


def test_a_clipped_score_is_logged_once_per_grader(caplog):
    """The clip itself, per sample: the first score a grader puts outside [0, 1] is logged once, naming the formula
    (or the python grader); the score is clipped as before."""
    import logging

    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    grader = build_grader({"type": "multi", "graders": {"a": eq, "b": eq},
                           "calculate_output": "1.25 * a + 0.75 * b - 0.25"})  # a formula no other test uses
    with caplog.at_level(logging.WARNING, logger="reftjax.graders"):
        first = grader.grade_batch([{"answer": "x"}] * 3, ["x", "y", "x"])
        again = grader.grade_batch([{"answer": "x"}], ["x"])
    assert [g.score for g in first + again] == [1.0, 0.0, 1.0, 1.0]  # 1.75 and -0.25 clipped
    # weights adding to 1 sum to 1.0000000000000002 at all ones: rounding, not a clip to warn of (regression review)
    four = build_grader({"type": "multi", "graders": dict.fromkeys("abcd", eq),
                         "calculate_output": "0.2 * a + 0.4 * b + 0.3 * c + 0.1 * d"})
    with caplog.at_level(logging.WARNING, logger="reftjax.graders"):
        assert four.grade_batch([{"answer": "x"}], ["x"])[0].score == 1.0
    # a complex power inside min() raised TypeError out of the whole batch; now that sample is a grader error
    root = build_grader({"type": "multi", "graders": {"a": eq}, "calculate_output": "min(1, (a - 0.5) ** 0.5)"})
    hit, miss = root.grade_batch([{"answer": "x"}] * 2, ["x", "no"])
    assert hit.score == pytest.approx(0.5 ** 0.5) and miss.score == 0.0 and is_fault(miss), miss
    lines = [r.getMessage() for r in caplog.records if r.name == "reftjax.graders"]
    assert len(lines) == 1 and lines[0].startswith("calculate_output '1.25 * a + 0.75 * b - 0.25' gave 1.75, "
                                                   "outside [0, 1]: clipped to 1"), lines
    penalty = build_grader({"type": "python", "source": "def grade(sample, item):\n    return -0.5 - len(item)\n"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reftjax.graders"):
        scores = [g.score for g in penalty.grade_batch([{"a": 1}, {}], ["x", "y"])]
    assert scores == [0.0, 0.0]
    lines = [r.getMessage() for r in caplog.records if r.name == "reftjax.graders"]
    assert len(lines) == 1 and lines[0].startswith("a python grader's grade() gave -1.5, outside [0, 1]"), lines


def test_a_completion_that_is_not_the_json_a_template_reads_is_unanswered_not_a_grader_error():
    """{{sample.output_json.x}} on a reply that is not JSON (or lacks the key) is the model's doing: score 0,
    counted as unanswered; it was counted as a grader error (OpenAI reports a sample parse error)."""
    from reftjax.graders.base import is_fault

    eq = {"type": "string_check", "input": "{{sample.output_json.city}}", "reference": "{{item.answer}}",
          "operation": "eq"}
    multi = {"type": "multi", "graders": {"a": eq}, "calculate_output": "a"}
    math_eq = {"type": "math_equiv", "input": "{{sample.output_json.n}}", "reference": "2"}
    for cfg in (eq, multi, math_eq):
        grades = build_grader(cfg).grade_batch([ITEM] * 3, ['{"city": "Paris", "n": "1+1"}', "Paris", "[1, 2]"])
        assert grades[0].score == 1.0 and grades[0].error is None, cfg["type"]
        assert [(g.score, is_fault(g)) for g in grades[1:]] == [(0.0, False)] * 2, cfg["type"]
        assert all("not found" in g.error for g in grades[1:])
    # a missing item field stays the grader's (config's) error
    assert is_fault(_one({**eq, "reference": "{{item.nope}}"}, '{"city": "Paris"}'))


def test_python_graders_import_numpy_and_rapidfuzz_and_others_are_checked_before_training(tmp_path, capsys):
    """OpenAI's own example grader (`from rapidfuzz import fuzz, utils`, WRatio) scored 0 as a grader error under
    reftjax: jobs running as uid 65534 import only what the sandbox server pre-imported. numpy and rapidfuzz are
    pre-imported now (numpy with one BLAS thread: a forked job's matmul waited forever on the server's threads);
    any other import is tried once when the grader is built for a run or validated by the CLI."""
    from reftjax.graders import check_imports
    from reftjax.graders.__main__ import main

    src = ("from rapidfuzz import fuzz, utils\nimport numpy as np\n\ndef grade(sample, item) -> float:\n"
           "    a = np.ones((300, 300))\n    assert (a @ a).sum() == 300 ** 3\n"
           "    assert np.median([1.0, 3.0]) == 2 and abs(np.fft.fft([1.0, 0.0])[0]) == 1\n"  # numpy.ma, numpy.fft
           "    assert np.char.lower(['A'])[0] == 'a'\n"
           "    return fuzz.WRatio(sample['output_text'], item['reference_answer'],"
           " processor=utils.default_process) / 100.0\n")
    grader = build_grader({"type": "python", "source": src})
    check_imports(grader)
    got = grader.grade_batch([{"reference_answer": "fuzzy wuzzy had no hair"}], ["fuzzy wuzzy was a bear"])[0]
    from rapidfuzz import fuzz, utils

    want = fuzz.WRatio("fuzzy wuzzy was a bear", "fuzzy wuzzy had no hair", processor=utils.default_process) / 100
    assert got.error is None and got.score == pytest.approx(want)
    bad = {"type": "multi", "calculate_output": "a", "graders": {"a": {
        "type": "python", "source": "def grade(sample, item):\n    import xml.dom.minidom\n    return 1.0\n"}}}
    with pytest.raises(ConfigError, match=r"grader.graders.a.source: its imports \(import xml.dom.minidom\) "
                                          r"fail in the sandbox .*'xml'"):
        check_imports(build_grader(bad))
    path = tmp_path / "g.json"
    path.write_text(json.dumps(bad))
    assert main(["validate", "--grader", str(path)]) == 2
    assert "fail in the sandbox" in capsys.readouterr().err
    assert main(["validate", "--grader", str(path), "--preimport", "xml.dom.minidom"]) == 0
    assert main(["validate", "--grader", str(path), "--preimport", "no_such_module"]) == 2
    assert "sandbox.preimport: no module named 'no_such_module'" in capsys.readouterr().err
    # graders that work must pass (regression review): a fallback import, one under an `if`, __future__, a star
    fallback = ("from __future__ import annotations\nfrom math import *\ntry:\n    import xml.dom.minidom as m\n"
                "except ImportError:\n    m = None\ndef grade(sample, item):\n    if item.get('never'):\n"
                "        import xml.sax\n    try:\n        import xml.etree\n    except (KeyError, ImportError):\n"
                "        pass\n    return floor(1.5)\n")
    g = build_grader({"type": "python", "source": fallback})
    check_imports(g)
    assert g.grade_batch([ITEM], ["x"])[0].score == 1.0
    # (second regression review) a `with suppress(ImportError)` fallback and a helper never called pass; imports in
    # a try's `finally` or unguarded `else` are tried; a blocked module (it loads sockets) is an ImportError, so a
    # fallback catches it also where jobs keep the caller's uid (it was a PermissionError)
    from reftjax.graders.sandbox import SandboxConfig, SandboxPool

    works = ("import contextlib\nwith contextlib.suppress(ImportError):\n    import xml.sax\n"
             "def _never():\n    import xml.dom\n"
             "def grade(sample, item):\n    try:\n        import asyncio\n        return 0.0\n"
             "    except ImportError:\n        return 1.0\n")
    with SandboxPool(SandboxConfig(workers=1, drop_uid=False)) as own_uid:
        for pool in (None, own_uid):
            g = build_grader({"type": "python", "source": works}, pool=pool)
            check_imports(g)
            assert g.grade_batch([ITEM], ["x"])[0].score == 1.0
    for tail in ("    pass\nfinally:\n    import xml.dom.minidom\n",
                 "    int('1')\nexcept ValueError:\n    pass\nelse:\n    import xml.dom.minidom\n"):
        src = "try:\n" + tail + "def grade(sample, item):\n    return 1.0\n"
        with pytest.raises(ConfigError, match=r"its imports \(import xml.dom.minidom\) fail"):
            check_imports(build_grader({"type": "python", "source": src}))
    # a preimport the server refuses (it loads sockets) is caught at start-up for every sandboxed grader, P-CoT
    # ReFT included: it zeroed every reward as "the model's failure"
    from reftjax.config import SandboxSettings
    from reftjax.graders.reft import default_pool

    blocked = default_pool(SandboxSettings(preimport=("asyncio",)).sandbox_config())
    for cfg in ({"type": "reft", "cot": "python"}, {"type": "python", "source": "def grade(s, i):\n    return 1"}):
        with pytest.raises(ConfigError, match="the sandbox cannot start: .*importing 'asyncio' loads blocked"):
            check_imports(build_grader(cfg, pool=blocked))
    program = build_grader({"type": "reft", "cot": "python"}, pool=blocked).grade_batch(
        [{"question": "q", "answer_value": "1"}], ["    return 1\n"])[0]
    assert program.score == 0.0 and is_fault(program)  # the grader's failure, not the program's
    # ...told by its status, not its text: a program raising an error named like it is the program's failure
    spoof = "    raise type('SandboxConfig.preimport', (Exception,), {})('x')\n"
    program = build_grader({"type": "reft", "cot": "python"}).grade_batch([{"question": "q", "answer_value": "1"}],
                                                                          [spoof])[0]
    assert program.score == 0.0 and not is_fault(program), program


def test_cli_run_and_validate(tmp_path, capsys):
    """The module's entry point runs once as a user starts it; the other calls ask `main` in this process (each
    subprocess paid ~3 s of imports)."""
    from reftjax.graders.__main__ import main

    def cli(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    grader = tmp_path / "g.json"
    grader.write_text(json.dumps({"type": "reft", "cot": "nl", "answer_field": "answer_value"}))
    samples = tmp_path / "s.jsonl"
    rows = [{"item": {"answer_value": "3"}, "sample": {"output_text": "1+2\nTherefore, the answer is: 3"}},
            {"item": {"answer_value": "4"}, "sample": {"output_text": "no idea"}}]
    samples.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = subprocess.run([sys.executable, "-m", "reftjax.graders", "run", "--grader", str(grader), "--samples",
                          str(samples)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert [json.loads(line)["score"] for line in out] == [1.0, 0.0]
    code, out, err = cli("validate", "--grader", str(grader))
    assert code == 0 and json.loads(out)["ok"] and "warnings" not in json.loads(out), err
    # a weighted sum that can pass 1 is valid, with a warning on stderr and under "warnings" (a TRL user's weights)
    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer_value}}",
          "operation": "eq"}
    weighted = tmp_path / "w.json"
    weighted.write_text(json.dumps({"type": "multi", "graders": {"fmt": eq, "cor": eq},
                                    "calculate_output": "0.5 * fmt + 1.0 * cor"}))
    code, out, err = cli("validate", "--grader", str(weighted))
    assert code == 0 and len(json.loads(out)["warnings"]) == 1, (out, err)
    assert err.startswith(f"warning: {weighted}: grader: calculate_output '0.5 * fmt + 1.0 * cor' reaches 1.5")
    samples.write_text(json.dumps(rows[0]) + "\n" + '{"item": {}}\n')
    code, out, err = cli("run", "--grader", str(grader), "--samples", str(samples))
    assert code == 2 and f"{samples}:2:" in err and out == ""
    # an item the grader cannot read is blamed on the samples file's own line (blank lines counted), the first too
    for text, line in (("\n\n" + json.dumps(rows[0]) + "\n\n" + json.dumps({**rows[1], "item": {}}) + "\n", 5),
                       (json.dumps({**rows[1], "item": {}}) + "\n", 1)):
        samples.write_text(text)
        code, out, err = cli("run", "--grader", str(grader), "--samples", str(samples))
        assert code == 2, err
        assert err.startswith(f"error: {samples}:{line}: grader does not fit"), err


def test_multi_grader_answers_vote():
    # a multi grade carried no extracted answer, so voting@k, weighted voting and rerank@k read 0% with it
    from reftjax.evaluate import majority_correct

    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    grader = build_grader({"type": "multi", "graders": {"a": eq}, "calculate_output": "a"})
    grades = grader.grade_batch([ITEM] * 4, ["Paris", "Paris", "Lyon", "Paris"])
    assert [g.extracted for g in grades] == ["Paris", "Paris", "Lyon", "Paris"]
    assert majority_correct(grades)


def test_rouge_matches_rouge_score_on_punctuated_mixed_case_text():
    # whitespace tokens scored "paris!" and "Paris" as different words (359 of 900 random cases differed)
    import random

    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rng = random.Random(0)
    words = ["The", "the", "cat", "sat,", "on", "mat.", "Paris", "paris!", "42", "x-y", "a", "dog"]
    for _ in range(200):
        cand = " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
        ref = " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
        want = scorer.score(ref, cand)
        for kind, key in (("1", "rouge1"), ("2", "rouge2"), ("l", "rougeL")):
            assert rouge(cand, ref, kind) == pytest.approx(want[key].fmeasure, abs=1e-9), (cand, ref, kind)


def test_non_string_references_render_as_their_text():
    """A list or dict reference field rendered with json.dumps' ASCII escapes (["\\u6771\\u4eac"]), so a model
    output equal to the reference scored 0 with string_check eq."""
    item = {"cities": ["東京", "Zürich"], "n": 4}
    assert render("{{item.cities}} {{item.n}}", {}, item) == '["東京", "Zürich"] 4'
    cfg = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.cities}}", "operation": "eq"}
    assert _one(cfg, '["東京", "Zürich"]', item).score == 1.0


def test_a_python_grader_must_return_a_finite_real_number():
    """OpenAI: grade() returns a float; "any other result (exception, invalid float value, etc.) will be marked as
    invalid and return a 0 grade". Text float() reads ('0.7', or the sample's own text: the model set its reward),
    inf and an int beyond float range (10**400) were scored as numbers. Real numbers of any type count (int, bool,
    numpy scalars) and are clipped to [0, 1]."""
    src = ("import numpy as np\n"
           "def grade(sample, item):\n"
           "    t = sample['output_text']\n"
           "    return {'text': t, 'str': '0.7', 'inf': float('inf'), 'nan': float('nan'), 'big': 10**400,\n"
           "            'zero': 0 * 10**400, 'bool': True, 'np32': np.float32(0.25), 'int': 3, 'neg': -0.5,\n"
           "            'none': None, 'npbool': np.isclose(1.0, 1.0)}.get(t, t)\n")
    texts = ["1", "str", "inf", "nan", "big", "zero", "bool", "np32", "int", "neg", "none", "npbool"]
    grades = build_grader({"type": "python", "source": src}).grade_batch([ITEM] * len(texts), texts)
    got = {t: (g.score, is_fault(g)) for t, g in zip(texts, grades)}
    assert got == {"1": (0.0, True), "str": (0.0, True), "inf": (0.0, True), "nan": (0.0, True),
                   "big": (0.0, True), "zero": (0.0, False), "bool": (1.0, False), "np32": (0.25, False),
                   "int": (1.0, False), "neg": (0.0, False), "none": (0.0, True), "npbool": (1.0, False)}
    assert "not a finite number: '0.7'" in grades[1].error


def test_cli_names_the_line_of_a_samples_file_that_is_not_utf8(tmp_path, capsys):
    from reftjax.graders.__main__ import main

    grader = tmp_path / "g.json"
    grader.write_text(json.dumps({"type": "string_check", "input": "{{sample.output_text}}",
                                  "reference": "{{item.answer}}", "operation": "eq"}))
    samples = tmp_path / "s.jsonl"
    ok = json.dumps({"item": {"answer": "x"}, "sample": {"output_text": "x"}}).encode()
    samples.write_bytes(ok + b"\n" + ok[:-3] + b"\xff\"}}\n")
    assert main(["run", "--grader", str(grader), "--samples", str(samples)]) == 2
    assert f"error: {samples}:2: not valid UTF-8" in capsys.readouterr().err
    samples.write_text("\n")  # an empty file: exit 0 and no output, where the data readers refuse one (review, s30)
    assert main(["run", "--grader", str(grader), "--samples", str(samples)]) == 2
    assert f"error: {samples}:0: no samples in the file" in capsys.readouterr().err


@pytest.mark.parametrize("row, got", [({"item": {"answer": "3"}, "sample": {"output_text": 3}}, "dict and int"),
                                      ({"item": ["3"], "sample": {"output_text": "3"}}, "list and str")])
def test_cli_refuses_a_sample_that_is_not_text_naming_its_line(tmp_path, capsys, row, got):
    """A number as output_text was graded as a grader fault per sample (exit 0); it is the file's error."""
    from reftjax.graders.__main__ import main

    grader = tmp_path / "g.json"
    grader.write_text(json.dumps({"type": "string_check", "input": "{{sample.output_text}}",
                                  "reference": "{{item.answer}}", "operation": "eq"}))
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"item": {"answer": "x"}, "sample": {"output_text": "x"}}) + "\n" + json.dumps(row))
    assert main(["run", "--grader", str(grader), "--samples", str(samples)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {samples}:2: expected an object 'item' and a string 'sample.output_text', got {got}")


@pytest.mark.parametrize("reference, message", [
    ("{item.answer}", "'{item.answer}' has single braces"),
    ("{ sample.output_text }", "'{ sample.output_text }' has single braces"),
    ("{{item.answer", "'{{item.answer' opens no field"),
    ("{{ item.answer}", "'{{ item.answer}' opens no field"),
    ("{{{item.answer}}}", "'{{{item.answer}}}' has three braces"),
    ("The answer: item.answer}}", "'item.answer}}' is closed but never opened"),
    # a brace opened around a field inside other text and never closed (second regression review, session 35)
    ("Answer: {{{item.answer}}", "'Answer: {{{item.answer}}' opens a brace around a field and never closes it"),
])
def test_a_field_reference_with_a_brace_typo_is_refused_not_rendered_as_text(reference, message):
    """`{item.answer}`, `{{item.answer`, `{{{item.answer}}}` and `{{ item.answer}` were accepted and rendered as
    text (the triple as `{Paris}`), so a string_check against the exact gold scored 0 on every sample (review)."""
    cfg = {"type": "string_check", "input": "{{sample.output_text}}", "reference": reference, "operation": "eq"}
    with pytest.raises(ConfigError, match="grader.reference: template text " + re.escape(message)):
        validate_grader(cfg, ITEM)


def test_braces_that_are_not_field_references_stay_text():
    cfg = {"type": "string_check", "input": "{{sample.output_text}}", "operation": "eq"}
    for reference, text in (('{"a": 1}', '{"a": 1}'), ('{"a": {"b": 1}}', '{"a": {"b": 1}}'),
                            (r"\frac{1}{2}", r"\frac{1}{2}"), ('{"a": {"b": {{item.answer}}}}', '{"a": {"b": Paris}}'),
                            ("{{ item.answer }}", "Paris"), ("[{{item.meta.unit}}]", "[km]"),
                            # a field in LaTeX's or a set's braces (refused as a typo at first; regression review)
                            (r"\boxed{{{item.answer}}}", r"\boxed{Paris}"),
                            ("{{{item.answer}}, {{item.meta.unit}}}", "{Paris, km}")):
        assert _one({**cfg, "reference": reference}, text).score == 1.0, reference


_SIM = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
        "evaluation_metric": "bleu"}


@pytest.mark.parametrize("cfg, message", [
    ({**_SIM, "evaluation_metric": ["bleu"]}, "grader.evaluation_metric: must be a string, got \\['bleu'\\]"),
    ({"type": "string_check", "input": "{{sample.output_text}}", "reference": "x", "operation": 1},
     "grader.operation: must be a string, got 1"),
    ({"type": "python", "source": "def grade(s, i):\n    return 1", "image_tag": 2}, "grader.image_tag: must be a "),
    ({**_SIM, "name": 7}, "grader.name: must be a string, got 7"),
    ({"type": "multi", "graders": {"a": {**_SIM, "name": None}}, "calculate_output": "a"},
     "grader.graders.a.name: must be a string"),
    # accepted and then ignored: a pass threshold or a score range the graders never apply (review)
    ({**_SIM, "pass_threshold": "high"}, "grader.pass_threshold: 'high' is not supported: this version counts a "
                                         "score of 1 as correct"),
    ({**_SIM, "pass_threshold": 0.8}, "grader.pass_threshold: 0.8 is not supported"),
    ({"type": "python", "source": "def grade(s, i):\n    return 1", "range": [1, 0]},
     "grader.range: must be \\[low, high\\] with low < high, got \\[1, 0\\]"),
    ({**_SIM, "range": "0-1"}, "grader.range: must be \\[low, high\\]"),
    ({**_SIM, "range": [0]}, "grader.range: must be \\[low, high\\] with low < high, got \\[0\\]"),
    ({**_SIM, "range": [1, 1]}, "grader.range: must be \\[low, high\\] with low < high, got \\[1, 1\\]"),
    ({**_SIM, "range": [0, 10]}, "grader.range: \\[0, 10\\] is not supported: the graders of this version score "
                                 "in \\[0, 1\\]"),
])
def test_a_field_of_the_wrong_type_or_an_ignored_setting_is_refused_naming_it(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_grader(cfg)


def test_openai_name_and_the_settings_this_version_applies_anyway_are_accepted():
    """`name` labels a grader (OpenAI requires it); pass_threshold 1 and range [0, 1] are what reftjax does."""
    for extra in ({"name": "sim"}, {"pass_threshold": 1}, {"pass_threshold": 1.0}, {"range": [0, 1]},
                  {"range": [0.0, 1.0]}):
        assert _one({**_SIM, **extra}, "Paris").score == 1.0


def test_a_math_equiv_answer_too_costly_to_evaluate_is_the_completions_zero_not_a_grader_error():
    """math_equiv's code is fixed, so a timeout comes from the completion's expression: `factorial(factorial(
    factorial(5)))` was a grader error (counted in grader_errors, 2 s a sample; sandbox review, session 38)."""
    from reftjax.graders.base import is_fault
    from reftjax.graders.build import build_grader
    from reftjax.graders.sandbox import SandboxConfig, SandboxPool

    with SandboxPool(SandboxConfig(workers=1, timeout_s=1.0)) as pool:
        grader = build_grader({"type": "math_equiv", "input": "{{sample.output_text}}", "reference": "{{item.x}}"},
                              pool=pool)
        slow, right = grader.grade_batch([{"x": "3"}] * 2, ["factorial(factorial(factorial(5)))", "3"])
    assert slow.score == 0.0 and not is_fault(slow) and "could not be evaluated: timeout" in slow.error
    assert right.score == 1.0


def test_cli_sandbox_options_reach_the_sandbox_and_default_to_a_runs(tmp_path, monkeypatch):
    """--timeout-s / --memory-mb set the sandbox the CLI's graders run in, by default at a run's (SandboxSettings);
    an option dropped or a default changed passed every test (mutation review, session 45)."""
    import reftjax.graders.__main__ as cli
    from reftjax.config import SandboxSettings

    seen = []
    real = cli.default_pool
    monkeypatch.setattr(cli, "default_pool", lambda config: seen.append(config) or real(config))
    grader = tmp_path / "g.json"
    grader.write_text(json.dumps({"type": "reft", "cot": "python"}))
    assert cli.main(["validate", "--grader", str(grader)]) == 0
    run = SandboxSettings().sandbox_config()
    assert (seen[-1].timeout_s, seen[-1].memory_bytes) == (run.timeout_s, run.memory_bytes)
    assert cli.main(["validate", "--grader", str(grader), "--timeout-s", "0.5", "--memory-mb", "512"]) == 0
    assert (seen[-1].timeout_s, seen[-1].memory_bytes) == (0.5, 512 << 20)


def test_cli_run_numbers_its_lines_needs_samples_and_names_a_grader_file_that_is_not_json(tmp_path, capsys):
    """`run` numbers its output lines from 0 (the samples' order), refuses to run without --samples (it printed
    nothing and exited 0), a grader file that is not JSON and an item the grader refuses with a ValueError are one
    line naming the file. Untested before (mutation review, session 45)."""
    from reftjax.graders.__main__ import main

    grader = tmp_path / "g.json"
    grader.write_text(json.dumps({"type": "string_check", "input": "{{sample.output_text}}",
                                  "reference": "{{item.answer}}", "operation": "eq"}))
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"item": {"answer": "x"}, "sample": {"output_text": t}}) + "\n"
                               for t in ("x", "y", "x")))
    assert main(["run", "--grader", str(grader), "--samples", str(samples)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["score"]) for r in rows] == [(0, 1.0), (1, 0.0), (2, 1.0)]
    assert main(["run", "--grader", str(grader)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: run needs --samples\n"
    grader.write_text('{"type": "string_check",\n "input": }\n')
    assert main(["validate", "--grader", str(grader)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {grader}:2: invalid JSON: ") and len(err.splitlines()) == 1
    # an item the grader refuses with a ValueError (a gold answer that is not a number): the samples file's line
    grader.write_text(json.dumps({"type": "reft", "cot": "nl", "answer_field": "answer_value"}))
    samples.write_text(json.dumps({"item": {"answer_value": "abc"}, "sample": {"output_text": "x"}}) + "\n")
    assert main(["run", "--grader", str(grader), "--samples", str(samples)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {samples}:1: grader does not fit this item: gold answer 'abc'"), err


def test_string_check_eq_and_ne_compare_the_texts_exactly():
    """OpenAI's string_check: `eq` / `ne` compare the rendered input and reference exactly (case and whitespace
    count; only `ilike` ignores case). No test had a near miss for `eq` but case, or any `ne` mismatch by case
    alone (mutation review, session 46)."""
    base = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
    assert [_one({**base, "operation": "eq"}, t).score for t in ("Paris", "Paris ", " Paris", "Paris\n")] == \
        [1.0, 0.0, 0.0, 0.0]
    assert [_one({**base, "operation": "ne"}, t).score for t in ("Paris", "paris", "Paris ")] == [0.0, 1.0, 1.0]
    assert _one({**base, "operation": "like"}, "Paris").score == 1.0  # the reference itself is a substring


def test_the_whole_output_json_is_a_template_field():
    """`{{sample.output_json}}` (the parsed completion, rendered as JSON text) is one of the documented fields."""
    cfg = {"type": "string_check", "input": "{{sample.output_json}}", "reference": '{"city": "Paris"}',
           "operation": "eq"}
    assert _one(cfg, '{"city":"Paris"}').score == 1.0  # re-rendered by json.dumps: spaces normalised
    assert _one(cfg, '{"city": "Rome"}').score == 0.0
    # a completion that is not JSON has no output_json: unanswered, not the text "null" (it passed `eq "null"` and
    # every `ne`; mutation review, session 55); the completion `null` is JSON and renders as null
    from reftjax.graders.base import is_fault

    null = {**cfg, "reference": "null"}
    grades = build_grader(null).grade_batch([ITEM] * 3, ["not json", "null", '{"a": 1}'])
    assert [(g.score, is_fault(g)) for g in grades] == [(0.0, False), (1.0, False), (0.0, False)]
    assert "output_json" in grades[0].error and "not found" in grades[0].error
    ne = build_grader({**cfg, "operation": "ne"}).grade_batch([ITEM] * 3, ["not json", '{"city": "Paris"}', "[]"])
    assert [g.score for g in ne] == [0.0, 0.0, 1.0]
    # a python grader still gets output_json None for such a completion (its own code decides)
    src = "def grade(sample, item):\n    return 1.0 if sample['output_json'] is None else 0.5\n"
    py = build_grader({"type": "python", "source": src})
    assert [g.score for g in py.grade_batch([ITEM] * 3, ["not json", "null", "[1]"])] == [1.0, 1.0, 0.5]


def test_text_similarity_of_unrelated_texts_is_zero_and_records_the_input():
    """No word in common: BLEU, GLEU and ROUGE are 0 (not a grader error: BLEU's unigram precision of 0 has no log),
    and the answer recorded (what votes) is the completion, not the reference; rouge_3..rouge_5 are built and count
    n-grams of that length (as `rouge-score` does: 3 of the 4 trigrams of 6 words match, F1 3/4; 1 of 2 5-grams)
    (mutation review, session 46)."""
    assert bleu("dogs bark", "the cat sat") == 0.0
    item = {"answer": "a b c d e g"}
    for metric, near in (("bleu", None), ("gleu", 14 / 18), ("rouge_1", 5 / 6), ("rouge_2", 0.8), ("rouge_3", 0.75),
                         ("rouge_4", 2 / 3), ("rouge_5", 0.5), ("rouge_l", 5 / 6), ("fuzzy_match", None)):
        cfg = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
               "evaluation_metric": metric}
        grade = _one(cfg, "zzz", item)
        assert (grade.score, grade.error, grade.extracted) == (0.0, None, "zzz"), metric
        assert _one(cfg, "a b c d e g", item).score == pytest.approx(1.0), metric
        grade = _one(cfg, "a b c d e f", item)
        assert grade.extracted == "a b c d e f" and 0 < grade.score < 1, metric
        assert near is None or grade.score == pytest.approx(near), metric


def test_multi_formulas_negate_and_refuse_booleans():
    """A unary minus negates (`1 + -a` is 1 - a): read as `+`, it scored a right answer's penalty as a bonus.
    `True` is no number of OpenAI's formula grammar (mutation review, session 46)."""
    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    g = build_grader({"type": "multi", "graders": {"a": eq}, "calculate_output": "1 + -a"})
    assert [x.score for x in g.grade_batch([ITEM] * 2, ["Paris", "Rome"])] == [0.0, 1.0]
    g = build_grader({"type": "multi", "graders": {"a": eq}, "calculate_output": "0.5 - -a / 2 + +0"})
    assert [x.score for x in g.grade_batch([ITEM] * 2, ["Paris", "Rome"])] == [1.0, 0.5]
    with pytest.raises(ConfigError, match="unsupported expression 'True'"):
        build_grader({"type": "multi", "graders": {"a": eq}, "calculate_output": "a * True"})


def test_a_formula_that_overflows_on_a_sample_is_a_grader_error_not_a_crash():
    """exp(1000) raises OverflowError (an ArithmeticError, not a ZeroDivisionError): that sample scores 0 as the
    grader's error and the rest of the batch is graded."""
    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    g = build_grader({"type": "multi", "graders": {"a": eq}, "calculate_output": "exp(1000 * a) / 2"})
    hit, miss = g.grade_batch([ITEM] * 2, ["Paris", "Rome"])
    assert hit.score == 0.0 and is_fault(hit) and "calculate_output: OverflowError" in hit.error
    assert miss.score == 0.5 and miss.error is None


def test_a_multi_grade_is_the_grader_s_fault_when_any_failed_part_is():
    """One part unanswered (the completion is not the JSON it reads) and another failing on the config (an item
    field the data lacks): the sample is the grader's error, not the model's unanswered sample."""
    eq = {"type": "string_check", "input": "{{sample.output_json.city}}", "reference": "{{item.answer}}",
          "operation": "eq"}
    broken = {**eq, "input": "{{sample.output_text}}", "reference": "{{item.nope}}"}
    g = build_grader({"type": "multi", "graders": {"a": eq, "b": broken}, "calculate_output": "a * b"})
    (grade,) = g.grade_batch([ITEM], ["not json"])
    assert grade.score == 0.0 and is_fault(grade) and grade.error.startswith("a: ") and "; b: " in grade.error
    only_model = build_grader({"type": "multi", "graders": {"a": eq}, "calculate_output": "a"})
    assert not is_fault(only_model.grade_batch([ITEM], ["not json"])[0])


def test_formula_reach_skips_complex_values_and_draws_corners_for_many_graders():
    """A formula that is complex at some sub-scores ((a - 0.5) ** 0.5 at a < 0.5) is checked where it is real, not
    crashed on; with more than 12 graders, corners are drawn at random besides all zeros, all ones and each grader
    alone: a formula that leaves [0, 1] only where two graders are 1 and two others 0 is caught there."""
    from reftjax.graders.build import reach_warnings

    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    assert reach_warnings(build_grader({"type": "multi", "graders": {"a": eq},
                                        "calculate_output": "(a - 0.5) ** 0.5"})) == []
    names = [f"g{i}" for i in range(13)]
    formula = "2 * g0 * g1 * (1 - g2) * (1 - g3)"
    (w,) = reach_warnings(build_grader({"type": "multi", "graders": dict.fromkeys(names, eq),
                                        "calculate_output": formula}))
    assert "reaches 2 (at g0=1, g1=1, g2=0, g3=0," in w, w


def test_math_equiv_answer_whose_evaluation_crashed_is_the_completions_zero():
    """A math_equiv job that ran out of memory (status `crashed`) is the completion's expression's doing, as a
    timeout is; a sandbox failure stays the grader's."""
    from reftjax.graders.sandbox import SandboxResult

    class Pool:
        def run(self, jobs):
            return [SandboxResult("crashed", error="MemoryError"), SandboxResult("timeout", error="1 s"),
                    SandboxResult("sandbox_failure", error="hung")][:len(jobs)]

    g = build_grader({"type": "math_equiv", "input": "{{sample.output_text}}", "reference": "{{item.x}}"},
                     pool=Pool())
    crashed, slow, broken = g.grade_batch([{"x": "3"}] * 3, ["9**9**9", "factorial(10**9)", "3"])
    assert [(x.score, is_fault(x)) for x in (crashed, slow, broken)] == [(0.0, False), (0.0, False), (0.0, True)]
    assert "could not be evaluated: crashed: MemoryError" in crashed.error


def test_an_empty_answer_does_not_vote():
    """A string_check on an empty completion records "" as its answer: no answer, so three empty replies do not
    outvote one right one (`has_answer`)."""
    from reftjax.evaluate import majority_correct

    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    grades = build_grader(eq).grade_batch([ITEM] * 4, ["", "", "", "Paris"])
    assert [g.score for g in grades] == [0.0, 0.0, 0.0, 1.0] and majority_correct(grades)


def test_gsm8k_defaults_give_way_to_the_config_and_a_sample_item_s_bad_gold_is_a_config_error():
    """`gsm8k` is `reft` with `extract: gsm8k` and `answer_field: answer` by default: a config's own answer_field
    wins. A sample item whose gold is not a number (ValueError, not KeyError) is refused as a ConfigError."""
    g = build_grader({"type": "gsm8k", "answer_field": "answer_value"})
    assert (g.extract, g.answer_field) == ("gsm8k", "answer_value")
    assert g.grade_batch([{"answer_value": "7"}], ["so 3 + 4\n#### 7"])[0].score == 1.0
    with pytest.raises(ConfigError, match="grader does not fit the sample item: gold answer 'three'"):
        validate_grader({"type": "reft"}, {"answer_value": "three"})


def test_fuzzy_match_is_the_character_ratio_not_a_token_or_partial_match():
    """fuzzy_match is `fuzz.ratio / 100`: 2 * LCS / (len a + len b) over the characters as written. "France Paris" and
    "Paris France" share at most 6 characters in order ("France"): 12 / 24 (WRatio scored them 0.95, partial_ratio
    0.67; no test told them apart: mutation review, session 55). Case counts: "paris" keeps 4 of "Paris"' 5."""
    cfg = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
           "evaluation_metric": "fuzzy_match"}
    assert _one(cfg, "France Paris", {"answer": "Paris France"}).score == pytest.approx(0.5)
    assert _one(cfg, "paris", ITEM).score == pytest.approx(0.8)  # "aris": 8 / 10


def test_a_completion_nested_too_deep_for_json_is_graded_as_text():
    """A reply of 100,000 `[` makes json.loads raise RecursionError, not ValueError: it is text that is not JSON, so
    output_text graders grade it and output_json fields are missing (the model's doing), not a grader error."""
    deep = "[" * 100000
    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    grade = _one(eq, deep, {"answer": deep})
    assert (grade.score, grade.error) == (1.0, None)
    grade = _one({**eq, "input": "{{sample.output_json.city}}"}, deep)
    assert grade.score == 0.0 and not is_fault(grade) and "not found" in grade.error


def test_reach_warning_allows_rounding_and_names_the_high_end_first():
    """Weights adding to 1 reach 1.0000000000000002 at all ones: rounding, not a formula to warn of. A formula that
    leaves [0, 1] at both ends is named where it passes 1 (mutation review, session 55)."""
    from reftjax.graders.build import reach_warnings

    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    four = {"type": "multi", "graders": dict.fromkeys("abcd", eq),
            "calculate_output": "0.2 * a + 0.4 * b + 0.3 * c + 0.1 * d"}
    assert reach_warnings(build_grader(four)) == []
    (w,) = reach_warnings(build_grader({"type": "multi", "graders": {"a": eq}, "calculate_output": "2 * a - 0.5"}))
    assert "reaches 1.5 (at a=1)" in w and "above 1 tie at 1" in w, w


def test_a_multi_grader_answer_type_is_its_first_sub_grader_s():
    """`answer_type` tells evaluation that a multi grader grades MathQA options (evaluate._is_mathqa)."""
    eq = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}
    mathqa = {"type": "reft", "answer_type": "mathqa"}
    assert build_grader({"type": "multi", "graders": {"a": eq, "r": mathqa}, "calculate_output": "a"}).answer_type == \
        "mathqa"
    assert build_grader({"type": "multi", "graders": {"a": eq}, "calculate_output": "a"}).answer_type is None


def test_the_imports_a_python_grader_always_runs_are_found_without_the_sandbox():
    """`check_imports` tries the imports a grader runs whenever it is called: those under a plain `with`, not those
    a bare `except:` or an `except Exception` guards (a fallback). A pure syntax walk (mutation review, session 55)."""
    import ast

    from reftjax.graders.build import _unconditional_imports

    src = ("import io\nwith open('x') as f:\n    import xml.dom\n"
           "try:\n    import xml.sax\nexcept:\n    pass\n"
           "try:\n    import xml.etree\nexcept Exception:\n    pass\n"
           "def grade(sample, item):\n    with io.StringIO():\n        import json\n    return 1\n")
    assert [ast.unparse(n) for n in _unconditional_imports(ast.parse(src).body)] == \
        ["import io", "import xml.dom", "import json"]
