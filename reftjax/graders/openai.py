"""OpenAI-RFT-style graders configured from a dict/JSON, plus the ReFT graders by name.

Config types (`build_grader(cfg)`):
  * `{"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
     "operation": "eq" | "ne" | "like" | "ilike"}`: 1 or 0; `like` = reference is a substring of
     input, `ilike` = the same ignoring case.
  * `{"type": "text_similarity", "input": ..., "reference": ..., "evaluation_metric":
     "fuzzy_match" | "bleu" | "gleu" | "meteor" | "rouge_1".."rouge_5" | "rouge_l" | "cosine"}`: fuzzy_match is
     `rapidfuzz.fuzz.ratio / 100`; bleu is sentence BLEU-4 (uniform weights, brevity penalty,
     +1 smoothing of n>1 precisions; words and punctuation marks are tokens, case kept); gleu is
     sentence GLEU (Wu et al. 2016, nltk's `sentence_gleu`: matched 1- to 4-grams over the larger of the
     two n-gram counts) on the same tokens; meteor is nltk's `single_meteor_score` on the same tokens, with
     WordNet's data where nltk finds it (`wordnet()`); rouge_n / rouge_l are F1 on the tokens of the `rouge-score`
     package's default tokenizer (lower case, runs of [a-z0-9]; no stemming). `cosine` asks an embeddings
     endpoint (`reftjax.graders.judge.CosineGrader`).
  * `{"type": "python", "source": "def grade(sample, item): ..."}`: run in the sandbox; the
     returned real number is clipped to [0, 1] (the first clip logged once); anything else (text, inf, NaN) is a
     grader error.
  * `{"type": "math_equiv", "input": ..., "reference": ...}`: sympy equivalence in the sandbox; the
     input must be a math expression (numbers, arithmetic, brackets, math functions, symbols), else
     it is a grading error (sympy's parser evals its text: see `MATH_EQUIV_SOURCE`).
  * A `python` grader that passes the sample to `sympify`/`parse_expr` evals it the same way: check it first.
  * `{"type": "multi", "graders": {"name": {...}}, "calculate_output": "0.5*a + 0.5*b"}`: the
     formula is parsed with `ast` (numbers, grader names, + - * / and ^ or ** for power, min, max, abs, floor,
     ceil, exp, sqrt, log: OpenAI's list) and clipped to [0, 1]: a weighted sum whose weights add to more than 1
     (TRL's `reward_weights`) or a penalty below 0 is clipped, so `reach_warning` (logged at a run's start, printed
     by `python -m reftjax.graders`) says where the formula leaves [0, 1]; a formula that fails on a sample (1 / 0)
     is a grader error.
  * `{"type": "reft", "cot": "nl" | "python", "answer_field": "answer_value", ...}` and
    `{"type": "gsm8k", "answer_field": "answer", "fallback": "none" | "last_number"}`.
  * `score_model` / `label_model`: a judge model over an OpenAI-compatible endpoint scores the sample or labels it
    (`reftjax.graders.judge`; `python -m reftjax.serve` serves any checkpoint reftjax loads as one).
  * Any type takes OpenAI's `name` (a label). `pass_threshold` and `range` are refused unless they say what this
    version does anyway (1: a score of 1 counts as correct; [0, 1]: every grader scores in it), not ignored.
Templates: `{{item.a.b}}`, `{{sample.output_text}}`, `{{sample.output_json.x}}` (spaces inside the braces allowed:
`{{ item.a }}`); a field with a brace typo (`{item.a}`, `{{item.a`, `{{{item.a}}}`) is refused, other braces are text.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import itertools
import json
import logging
import math
import operator
import random
import re
import sys
import threading
import warnings
from typing import Any, Mapping, Sequence

from rapidfuzz import fuzz

from reftjax.graders.base import Grade, Item, PerItemGrader, _check_lengths, faulted, has_answer, is_fault
from reftjax.graders.reft import default_pool
from reftjax.graders.sandbox import SandboxJob, SandboxPool
from reftjax.host import torch_unblocked

_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")
_ANY_TEMPLATE = re.compile(r"\{\{.*?\}\}")  # what looks like a field but `_TEMPLATE` would leave as text


log = logging.getLogger("reftjax.graders")
_CLIPPED: set = set()  # the graders (by key) that have logged a clipped score in this process
_CLIPPED_LOCK = threading.Lock()
_SLACK = 1e-9  # rounding: 0.2 * a + 0.4 * b + 0.3 * c + 0.1 * d is 1.0000000000000002 at 1, 1, 1, 1


def clip01(score: float, what: str, key) -> float:
    """`score` clipped to [0, 1], the range every grader scores in (OpenAI's). The first score beyond it (by more
    than rounding) that a grader (`key`) gives in this process is logged, naming `what`: a python grader's 2 or -1
    and a formula's 1.5 were clipped silently, so a format reward weighted on top of a correctness reward vanished
    from correct answers and a penalty from every sample (review, session 37)."""
    clipped = min(1.0, max(0.0, score))
    if -_SLACK <= score <= 1.0 + _SLACK:
        return clipped
    with _CLIPPED_LOCK:
        first = key not in _CLIPPED
        _CLIPPED.add(key)
    if first:
        log.warning("%s gave %r, outside [0, 1]: clipped to %g (every grader scores in [0, 1]: scale its score "
                    "into it)", what, score, clipped)
    return clipped


class ConfigError(ValueError):
    """A grader config that cannot work; the message names the config path."""


class SampleFieldMissing(KeyError):
    """A `{{sample.output_json...}}` field the completion does not have (not JSON, or no such key): the model's
    doing, so the sample is unanswered (score 0), not a grader error (OpenAI reports it as a sample parse error)."""

    not_a_fault = True


def _lookup(root: Mapping[str, Any], path: str, prefix: str) -> Any:
    value: Any = root
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise (SampleFieldMissing if prefix == "sample" else KeyError)(
                f"template field {{{{{prefix}.{path}}}}} not found" +
                (" (the completion is not JSON with that key)" if prefix == "sample" else ""))
        value = value[part]
    return value


def sample_of(text: str) -> dict:
    """The `sample` namespace of templates: output_text and, when the completion parses as JSON, output_json. A
    completion that is not JSON has none, so `{{sample.output_json}}` is a missing field (unanswered, score 0) as
    `{{sample.output_json.x}}` is: it rendered as `null`, so "not json" passed `eq "null"` and every `ne` check
    (mutation review, session 55). A python grader's `sample` holds output_json None then (`SandboxedGrader._args`)."""
    try:
        return {"output_text": text, "output_json": json.loads(text)}
    except (ValueError, RecursionError):  # (a run of 1,000 `[` raised out of the batch; review E, session 42)
        return {"output_text": text}


def render(template: str, sample: Mapping, item: Item) -> str:
    """Fills `{{item.x}}` / `{{sample.y}}`; raises KeyError naming a missing field."""
    def sub(match):
        path = match.group(1)
        head, _, rest = path.partition(".")
        if head not in ("item", "sample") or not rest:
            raise KeyError(f"template field {{{{{path}}}}} must start with item. or sample.")
        value = _lookup(item if head == "item" else sample, rest, head)
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return _TEMPLATE.sub(sub, template)


def check_template(template: str) -> None:
    """What a template's fields can be checked for without an item: `item.*`, `sample.output_text` or
    `sample.output_json[.*]`, each a dotted name; raises KeyError naming the first that is not."""
    for path in _TEMPLATE.findall(template):
        if not path.startswith("item.") and path not in ("sample.output_text", "sample.output_json") and \
                not path.startswith("sample.output_json."):
            raise KeyError(f"template field {{{{{path}}}}} must be item.*, sample.output_text or sample.output_json.*")
    loose = _ANY_TEMPLATE.findall(_TEMPLATE.sub("", template))
    if loose:
        raise KeyError(f"template field {loose[0]} is not a dotted name of letters, digits and _")
    _check_braces(template)


def check_item_fields(templates, item: Item) -> None:
    """Each template checked (`check_template`) and its `{{item.*}}` fields looked up in `item`: raises KeyError
    naming the first that is missing."""
    for template in templates:
        check_template(template)
        for path in _TEMPLATE.findall(template):
            if path.startswith("item."):
                _lookup(item, path[5:], "item")


def _check_braces(template: str) -> None:
    """Raises KeyError for a field reference that is not `{{...}}`: rendered as literal text, it could never match
    (a `string_check` reference `{item.answer}` scored the exact gold 0). Refused: `{{` that opens no field
    (`{{item.x`, `{{ item.x}`), a template that is one field inside a third brace (`{{{item.x}}}`: in other text
    such braces are LaTeX's or a set's, `\\boxed{{{item.x}}}`), and `{item.` / `{sample.` or `item.x}` / `sample.x}`
    with single braces, and a brace opened around a field that the text never closes (`Answer: {{{item.x}}`). Other
    braces are text (`{"a": {"b": 1}}`, `\\frac{1}{2}`)."""
    rest = _TEMPLATE.sub("\0", template)  # (each field one mark: the text around it stays apart)
    for pattern, why in ((r"\{\{", "opens no field: a template field is {{item.x}} or {{sample.x}}"),
                         # (a field in braces inside other text is LaTeX or a set: \boxed{{{item.a}}}, {{{a}}, {{b}}})
                         (r"^\s*\{\0\}?\s*$", "has three braces: a template field is {{item.x}} or {{sample.x}}"),
                         (r"\{\s*(?:item|sample)\.[\w.]*\s*\}?", "has single braces: write {{...}}"),
                         (r"(?<![\w.])(?:item|sample)\.[\w.]*\s*\}+", "is closed but never opened: write {{...}}")):
        bad = re.search(pattern, rest)
        if bad:
            fields = iter(_TEMPLATE.findall(template)[rest[:bad.start()].count("\0"):])
            text = re.sub("\0", lambda _: "{{%s}}" % next(fields), rest[bad.start():bad.end() + 20])
            raise KeyError(f"template text {text!r} {why}")
    if "{\0" in rest and rest.count("{") != rest.count("}"):  # (second regression review, session 35)
        raise KeyError(f"template text {template!r} opens a brace around a field and never closes it")


@dataclasses.dataclass(frozen=True)
class _Templated(PerItemGrader):
    input: str = "{{sample.output_text}}"
    reference: str = ""

    def validate(self, item: Item) -> None:
        check_item_fields((self.input, self.reference), item)

    def pair(self, item: Item, text: str) -> tuple[str, str]:
        sample = sample_of(text)
        return render(self.input, sample, item), render(self.reference, sample, item)


@dataclasses.dataclass(frozen=True)
class StringCheckGrader(_Templated):
    operation: str = "eq"

    def grade(self, item: Item, text: str) -> Grade:
        a, b = self.pair(item, text)
        ops = {"eq": a == b, "ne": a != b, "like": b in a, "ilike": b.lower() in a.lower()}
        return Grade(float(ops[self.operation]), extracted=a[:200])


def _ngrams(tokens: list[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu_tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text)


def bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU (uniform weights, brevity penalty, add-one smoothing for n > 1) on word and punctuation tokens
    (nltk's `wordpunct_tokenize`: whitespace tokens scored "Paris." against "Paris" 0; review, session 27). An order n
    longer than the candidate has no n-grams and counts as 1, so an exact answer of under 4 tokens scores 1 (nltk's
    `sentence_bleu` with method2 smoothing: 0.595 for "Paris" against "Paris"); from 4 tokens on they agree."""
    cand, ref = _bleu_tokens(candidate), _bleu_tokens(reference)
    if not cand or not ref:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        c, r = _ngrams(cand, n), _ngrams(ref, n)
        hits, total = sum((c & r).values()), max(sum(c.values()), 0)
        if n == 1 and hits == 0:
            return 0.0
        smooth = 0 if n == 1 else 1
        log_p += math.log((hits + smooth) / (total + smooth)) / max_n
    brevity = min(0.0, 1.0 - len(ref) / len(cand))
    return math.exp(log_p + brevity)


def gleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence GLEU (Wu et al. 2016; nltk's `sentence_gleu`) on BLEU's word and punctuation tokens: the 1- to
    `max_n`-grams the two share (clipped counts) over the larger of their n-gram totals, i.e. min(precision,
    recall). No smoothing and no brevity penalty: a prefix of the reference loses recall, padding loses precision."""
    cand, ref = _bleu_tokens(candidate), _bleu_tokens(reference)
    c = sum((_ngrams(cand, n) for n in range(1, max_n + 1)), collections.Counter())
    r = sum((_ngrams(ref, n) for n in range(1, max_n + 1)), collections.Counter())
    total = max(sum(c.values()), sum(r.values()))
    return sum((c & r).values()) / total if total else 0.0


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge(candidate: str, reference: str, kind: str) -> float:
    """ROUGE-N (kind "1".."5") or ROUGE-L ("l") F1 on `rouge-score`'s default tokens: lower case, runs of
    [a-z0-9] (punctuation separates tokens: "Paris!" matches "paris"; whitespace tokens did not)."""
    cand, ref = _rouge_tokens(candidate), _rouge_tokens(reference)
    if not cand or not ref:
        return 0.0
    if kind == "l":
        prev = [0] * (len(ref) + 1)
        for tok in cand:
            cur = [0]
            for j, r in enumerate(ref):
                cur.append(prev[j] + 1 if tok == r else max(prev[j + 1], cur[j]))
            prev = cur
        hits, n_cand, n_ref = prev[-1], len(cand), len(ref)
    else:
        n = int(kind)
        c, r = _ngrams(cand, n), _ngrams(ref, n)
        hits, n_cand, n_ref = sum((c & r).values()), sum(c.values()), sum(r.values())
    if hits == 0:
        return 0.0
    p, q = hits / n_cand, hits / n_ref
    return 2 * p * q / (p + q)


METEOR_SETUP = "python -m nltk.downloader wordnet, or a copy under $NLTK_DATA"
_WORDNET: dict = {}  # nltk.data.path (as a tuple) -> WordNet's reader, loaded once
_WORDNET_LOCK = threading.Lock()


def _nltk():
    """(nltk.data, WordNetCorpusReader, single_meteor_score). nltk's first import runs under `torch_unblocked`
    (nltk imports scipy.stats, which reads sys.modules["torch"]); later calls only look the modules up, so the block
    is lifted once, not per graded pair."""
    if "nltk.translate.meteor_score" not in sys.modules:
        with torch_unblocked():
            import nltk.translate.meteor_score  # noqa: F401
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.translate.meteor_score import single_meteor_score
    return nltk.data, WordNetCorpusReader, single_meteor_score


def wordnet(where: str = "grader"):
    """nltk's WordNet reader for METEOR's synonym stage, found where nltk looks for it (`nltk.data.path`, which
    $NLTK_DATA extends: `corpora/wordnet.zip` as nltk's downloader leaves it, or `corpora/wordnet`) and loaded once
    per search path (a few seconds: its lemma index). Raises ConfigError naming `where` and how to install what is
    missing: a METEOR without WordNet would score differently under the same name."""
    try:
        nltk_data, WordNetCorpusReader, _ = _nltk()
    except ImportError:
        raise ConfigError(f"{where}: evaluation_metric 'meteor' needs nltk (pip install nltk; a dependency of "
                          f"reftjax's) and WordNet's data ({METEOR_SETUP})") from None
    key = tuple(nltk_data.path)
    with _WORDNET_LOCK:
        if key not in _WORDNET:
            for name in ("corpora/wordnet.zip/wordnet/", "corpora/wordnet"):  # (nltk's own LazyCorpusLoader order)
                try:
                    root = nltk_data.find(name)
                    break
                except LookupError:
                    continue
            else:
                raise ConfigError(f"{where}: evaluation_metric 'meteor' needs WordNet's data for nltk, found in none "
                                  f"of {list(key)} ({METEOR_SETUP})")
            try:
                with warnings.catch_warnings():  # "multilingual functions are not available": not used here
                    warnings.simplefilter("ignore", UserWarning)
                    _WORDNET[key] = WordNetCorpusReader(root, None)
            except Exception as exc:  # a partial or damaged copy: nltk raises OSError, ValueError, AssertionError
                raise ConfigError(f"{where}: WordNet's data at {root} cannot be read ({type(exc).__name__}: {exc}; "
                                  f"{METEOR_SETUP})") from None
        return _WORDNET[key]


def meteor(candidate: str, reference: str) -> float:
    """METEOR (Banerjee and Lavie 2005) as nltk's `single_meteor_score` computes it, with its defaults (alpha 0.9,
    beta 3, gamma 0.5; lower case; exact, then Porter-stem, then WordNet-synonym matches), on BLEU's word and
    punctuation tokens. nltk's synonym stage looks up the Porter stems its stem stage leaves: "auto" meets "car" and
    "fast" meets "quick", but "automobile" ("automobil") and "large" ("larg") meet no synonym."""
    cand, ref = _bleu_tokens(candidate), _bleu_tokens(reference)
    if not cand or not ref:
        return 0.0
    return _nltk()[2](ref, cand, wordnet=wordnet())


@dataclasses.dataclass(frozen=True)
class TextSimilarityGrader(_Templated):
    evaluation_metric: str = "fuzzy_match"

    def grade(self, item: Item, text: str) -> Grade:
        a, b = self.pair(item, text)
        m = self.evaluation_metric
        if m == "fuzzy_match":
            score = fuzz.ratio(a, b) / 100.0
        elif m == "bleu":
            score = bleu(a, b)
        elif m == "gleu":
            score = gleu(a, b)
        elif m == "meteor":
            score = meteor(a, b)
        else:
            score = rouge(a, b, m.split("_")[1])
        return Grade(min(1.0, max(0.0, score)), extracted=a[:200])


@dataclasses.dataclass(frozen=True)
class SandboxedGrader:
    """`python` (user `grade(sample, item)`) and `math_equiv` graders, batched in the sandbox."""

    source: str
    entry: str = "grade"
    input: str = "{{sample.output_text}}"
    reference: str = ""
    pool: SandboxPool | None = dataclasses.field(default=None, compare=False, repr=False)
    uses_sandbox = True

    @property
    def votes_on_answer(self) -> bool:
        """math_equiv records the rendered answer it compared (votes group equal answers); a `python` grader
        records only the score its `grade()` returned, so voting@k over it would vote on right/wrong and is
        not reported (`reftjax.evaluate`)."""
        return self.entry != "grade"

    def validate(self, item: Item) -> None:
        _Templated(self.input, self.reference).validate(item)

    def _args(self, item: Item, text: str) -> tuple:
        if self.entry == "grade":
            return ({"output_json": None, **sample_of(text)}, dict(item))
        return _Templated(self.input, self.reference).pair(item, text)

    def grade_batch(self, items: Sequence[Item], texts: Sequence[str]) -> list[Grade]:
        _check_lengths(items, texts)
        jobs, errors = [], {}
        for i, (item, text) in enumerate(zip(items, texts)):
            try:
                jobs.append(SandboxJob(self.source, self.entry, self._args(item, text)))
            except (KeyError, TypeError, ValueError) as exc:
                errors[i] = exc
                jobs.append(SandboxJob("def grade():\n    return 0", "grade"))
        results = (self.pool or default_pool()).run(jobs)
        grades = []
        for i, r in enumerate(results):
            value = r.value_float
            if self.entry == "grade" and r.ok and not (r.value_real and value is not None and math.isfinite(value)):
                # OpenAI: grade() returns a float, "any other result (exception, invalid float value, etc.) will be
                # marked as invalid and return a 0 grade": text such as '0.7' or the sample's own output_text (a
                # model could set its reward), inf and 10**400 were read as numbers (review, session 27)
                value = None
            if isinstance(errors.get(i), SampleFieldMissing):
                grades.append(Grade(0.0, error=errors[i].args[0]))  # the completion's doing: unanswered
            elif self.entry != "grade" and i not in errors and r.status in ("timeout", "crashed"):
                # math_equiv's own code is fixed: what runs out of time or memory is the completion's expression
                # (`factorial(factorial(factorial(5)))` was a grader error; sandbox review, session 38)
                grades.append(Grade(0.0, error=f"the answer could not be evaluated: {r.status}: {r.error}"))
            elif i in errors or not r.ok or value is None or math.isnan(value):
                why = (f"input error: {errors[i]}" if i in errors else f"{r.status}: {r.error}" if not r.ok else
                       f"not a finite number: {r.value_str!r}")
                grades.append(faulted(why))  # the grader's code (or its input) failed: not the completion's doing
            else:
                answer = r.value_str if self.entry == "grade" else str(jobs[i].args[0]).strip()[:200]
                grades.append(Grade(clip01(value, "a python grader's grade()", ("python", self.source)),
                                    extracted=answer))
        return grades


# parse_expr evals its text, and this job also holds the gold: a prediction that were code could read it from the
# caller's frame (a completion did, scoring 1.0 against any gold). Only numbers, arithmetic, brackets, and names that
# are math functions or that parse_expr turns into symbols (not Python builtins, keywords, other sympy names or
# names starting with `_`) get that far; no attribute access, strings, subscripts or comparisons.
MATH_EQUIV_SOURCE = '''
import builtins as _builtins
import keyword as _keyword
import re as _re
import unicodedata as _unicodedata

_MATH_NAMES = {"sqrt", "cbrt", "root", "pi", "exp", "log", "ln", "sin", "cos", "tan", "cot", "sec", "csc", "asin",
               "acos", "atan", "acot", "asec", "acsc", "sinh", "cosh", "tanh", "coth", "sech", "csch", "asinh",
               "acosh", "atanh", "Abs", "abs", "sign", "re", "im", "factorial", "binomial", "gamma", "beta", "zeta",
               "floor", "ceiling", "frac", "round", "oo", "gcd", "lcm", "Rational", "Integer", "Float", "Mod", "Min",
               "Max", "min", "max", "Catalan", "GoldenRatio", "EulerGamma"}
_NUMBER = _re.compile(r"(?<![\\w.])(?:\\d+[.]?\\d*|[.]\\d+)(?:[eE][-+]?\\d+)?")


def _math_only(text):
    if not all(c in " \\t\\n+-*/().!_" or c.isalnum() for c in text):
        return False
    rest = _NUMBER.sub(" ", text)  # 1E1, 2.5e-3, 1.e5 are numbers, not names or attribute access
    if _re.search(r"[.]\\s*[^\\W\\d]", rest) or "__" in rest:
        return False
    for name in _re.findall(r"[^\\W\\d]\\w*", rest):
        if name.startswith("_") or (len(name) > 1 and name not in _MATH_NAMES and (
                _keyword.iskeyword(name) or hasattr(_builtins, name) or hasattr(sympy, name))):
            return False
    return True


def equiv(pred, gold):
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations, implicit_multiplication_application
    t = standard_transformations + (implicit_multiplication_application,)
    clean = lambda s: s.strip().strip("$").replace("^", "**").replace(",", "")
    pred = _unicodedata.normalize("NFKC", clean(pred))  # as Python reads names: the text checked is the text parsed
    if not _math_only(pred):
        raise ValueError("not a math expression (numbers, arithmetic, brackets and math functions only)")
    a, b = parse_expr(pred, transformations=t), parse_expr(clean(gold), transformations=t)
    return 1.0 if sympy.simplify(a - b) == 0 else 0.0
'''

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}
# OpenAI's calculate_output functions (their grader guide): name -> (function, least and most arguments)
_FUNCS = {"min": (min, 2, None), "max": (max, 2, None), "abs": (abs, 1, 1), "floor": (math.floor, 1, 1),
          "ceil": (math.ceil, 1, 1), "exp": (math.exp, 1, 1), "sqrt": (math.sqrt, 1, 1), "log": (math.log, 1, 1)}


def parse_formula(text: str) -> ast.Expression:
    """A `calculate_output` formula as a Python expression: OpenAI's `^` is power (`**`, which binds as tightly:
    `a ^ 2 + 1` is a**2 + 1; Python's `^` is xor, below `+`). Raises SyntaxError."""
    return ast.parse(text.replace("^", "**"), mode="eval")


def check_formula(node: ast.AST, names) -> None:
    """Raises ConfigError for anything but numbers, grader `names`, + - * / ** ^, unary +/-, and OpenAI's functions
    with their argument counts (a syntax walk: the formula is not evaluated, so no part of it goes unchecked)."""
    if isinstance(node, ast.Expression):
        return check_formula(node.body, names)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return None
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ConfigError(f"unknown name {node.id!r} (graders: {sorted(names)})")
        return None
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        check_formula(node.left, names)
        return check_formula(node.right, names)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return check_formula(node.operand, names)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
        _, least, most = _FUNCS[node.func.id]
        if node.keywords or len(node.args) < least or (most is not None and len(node.args) > most):
            raise ConfigError(f"{node.func.id}() takes {least}{'' if most == least else ' or more'} "
                              f"argument{'s' * (least > 1)}, got {ast.unparse(node)!r}")
        for a in node.args:
            check_formula(a, names)
        return None
    raise ConfigError(f"unsupported expression {ast.unparse(node)!r} (numbers, grader names, + - * / ^ and "
                      f"{', '.join(_FUNCS)})")


def _eval_formula(node: ast.AST, env: Mapping[str, float]) -> float:
    """Evaluates a formula `check_formula` accepted."""
    if isinstance(node, ast.Expression):
        return _eval_formula(node.body, env)
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval_formula(node.left, env), _eval_formula(node.right, env))
    if isinstance(node, ast.UnaryOp):
        value = _eval_formula(node.operand, env)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call):
        return float(_FUNCS[node.func.id][0](*(_eval_formula(a, env) for a in node.args)))
    raise ConfigError(f"unsupported expression {ast.unparse(node)!r}")


def _grid(n: int):
    """Sub-score points for `formula_reach`: {0, 0.5, 1}^n (n <= 7), the corners {0, 1}^n (n <= 12), else 4,096
    corners drawn with a fixed seed plus all zeros, all ones and each grader alone at 1 and at 0."""
    if n <= 7:
        return itertools.product((0.0, 0.5, 1.0), repeat=n)
    if n <= 12:
        return itertools.product((0.0, 1.0), repeat=n)
    rng = random.Random(0)
    unit = [tuple(float(i == j) for j in range(n)) for i in range(n)]
    return [(0.0,) * n, (1.0,) * n, *unit, *(tuple(1.0 - x for x in u) for u in unit),
            *(tuple(float(rng.random() < 0.5) for _ in range(n)) for _ in range(4096))]


def formula_reach(tree: ast.Expression, names: Sequence[str]):
    """(lowest value, its sub-scores, highest value, its sub-scores) of a formula over the sub-score points of
    `_grid`, points where it fails or is not a real number skipped; None when it fails at every point. Weighted
    sums and their min/max reach their extremes at the corners; the midpoints catch most else."""
    lo = hi = None
    for point in _grid(len(names)):
        env = dict(zip(names, point))
        try:
            value = _eval_formula(tree, env)
        except (ArithmeticError, ValueError, TypeError):  # (TypeError: a complex value inside min/max/floor)
            continue
        if isinstance(value, complex) or math.isnan(value):
            continue
        if lo is None or value < lo[0]:
            lo = (value, env)
        if hi is None or value > hi[0]:
            hi = (value, env)
    return None if lo is None else (*lo, *hi)


@dataclasses.dataclass(frozen=True)
class MultiGrader:
    graders: Mapping[str, Any]
    calculate_output: str

    def __post_init__(self):  # SyntaxError or ConfigError: a formula that cannot work fails here, not per sample
        check_formula(parse_formula(self.calculate_output), self.graders)

    @property
    def votes_on_answer(self) -> bool:
        """Votes go by the first sub-grader's answer that has one (see `grade_batch`)."""
        return any(getattr(g, "votes_on_answer", True) for g in self.graders.values())

    @property
    def uses_sandbox(self) -> bool:
        return any(getattr(g, "uses_sandbox", False) for g in self.graders.values())

    @property
    def answer_type(self) -> str | None:
        """The first sub-grader's kind of answer that has one (a ReFT grader's "numeric" or "mathqa")."""
        return next((t for g in self.graders.values() if (t := getattr(g, "answer_type", None))), None)

    def reach_warning(self) -> str | None:
        """Where the formula leaves [0, 1] for sub-scores in [0, 1] (`formula_reach`), or that it fails at every
        point tried, as a sentence; else None."""
        reach = formula_reach(parse_formula(self.calculate_output), list(self.graders))
        if reach is None:
            return (f"calculate_output {self.calculate_output!r} fails (or is not a real number) at every point "
                    f"tried with sub-scores in [0, 1]: a sample where it fails scores 0 as a grader error")
        lo, lo_at, hi, hi_at = reach
        if lo >= -_SLACK and hi <= 1 + _SLACK:
            return None
        value, at = (hi, hi_at) if hi > 1 + _SLACK else (lo, lo_at)
        where = ", ".join(f"{k}={v:g}" for k, v in at.items())
        ties = "above 1 tie at 1" if value > 1 else "below 0 tie at 0"
        return (f"calculate_output {self.calculate_output!r} reaches {value:g} (at {where}) from sub-scores in "
                f"[0, 1], and its score is clipped to [0, 1]: samples it puts {ties}; scale it into [0, 1] (e.g. "
                f"divide a weighted sum by the sum of its weights)")

    def validate(self, item: Item) -> None:
        for g in self.graders.values():
            g.validate(item)

    def grade_batch(self, items: Sequence[Item], texts: Sequence[str]) -> list[Grade]:
        tree = parse_formula(self.calculate_output)
        parts = {name: g.grade_batch(items, texts) for name, g in self.graders.items()}
        order = sorted(parts, key=lambda n: not getattr(self.graders[n], "votes_on_answer", True))  # stable
        out = []
        for i in range(len(texts)):
            env = {name: grades[i].score for name, grades in parts.items()}
            failed = {name: grades[i].error for name, grades in parts.items() if grades[i].error is not None}
            if failed:  # a sub-grader that could not grade scores the whole sample 0 (its 0 could raise `1 - a`)
                fault = any(is_fault(grades[i]) for grades in parts.values() if grades[i].error is not None)
                out.append(Grade(0.0, error="; ".join(f"{n}: {e}" for n, e in failed.items()),
                                 details={"scores": env, **({"grader_fault": True} if fault else {})}))
                continue
            try:
                score = _eval_formula(tree, env)
                error = None
            except (ArithmeticError, ValueError, TypeError) as exc:  # 1 / 0, exp(1000), sqrt(-1), log(0), and
                # min / floor of a complex power ((a - 0.5) ** 0.5 at a < 0.5), which raised out of the batch
                score, error = 0.0, f"calculate_output: {type(exc).__name__}: {exc}"
            if isinstance(score, complex):  # e.g. (a - 0.75) ** 0.5 with a < 0.75
                score, error = 0.0, f"calculate_output: not a real number ({score})"
            if error is not None:  # the formula's failure is the grader's, not the completion's
                out.append(Grade(0.0, error=error, details={"scores": env, "grader_fault": True}))
                continue
            score = 0.0 if math.isnan(score) else clip01(score, f"calculate_output {self.calculate_output!r}",
                                                         ("multi", self.calculate_output))
            # the answer that votes (majority voting, reranking): the first sub-grader's, in config order, that has one
            # (sub-graders that record an answer before those that record only a score, as `python` does)
            answer = next((parts[n][i].extracted for n in order if has_answer(parts[n][i])), None)
            out.append(Grade(score, extracted=answer, error=error, details={"scores": env}))
        return out
