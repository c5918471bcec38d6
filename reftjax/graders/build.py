"""Builds and validates graders from dict/JSON configs (see `reftjax.graders.openai` for types)."""
from __future__ import annotations

import ast
import dataclasses
import math
from typing import Any, Mapping

from reftjax.graders import openai as oa
from reftjax.graders.base import Item
from reftjax.graders.judge import ENDPOINT_KEYS, build_cosine_grader, build_model_grader
from reftjax.graders.reft import ReftGrader, default_pool
from reftjax.graders.sandbox import SandboxJob, SandboxPool

ConfigError = oa.ConfigError
_METRICS = ("fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
            "rouge_l")
_OPTIONAL = {"name", "pass_threshold", "range"}
# the fields whose value is text (a non-string failed later, e.g. `answer_field: 3` as an AttributeError traceback
# once the model and data had loaded; review); templates, `source` and `calculate_output` are checked where used
_TEXT = {"name", "operation", "evaluation_metric", "image_tag", "cot", "answer_field", "answer_type", "extract",
         "fallback", "question_field"}


# what type "gsm8k" sets beside a ReFT grader's defaults (raw GSM8K: "#### N" in the `answer` field); the resume
# check compares graders with these filled in (`train._grader_defaults`)
GSM8K_FIELDS = {"extract": "gsm8k", "answer_field": "answer"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_types(cfg: Mapping, where: str) -> None:
    """Refuses a field of the wrong type, naming it and the type wanted, and OpenAI's `pass_threshold` / `range`
    where this version would ignore them (graders score in [0, 1]; a score of 1 is what counts as correct)."""
    for k in sorted(_TEXT & set(cfg)):
        if not isinstance(cfg[k], str):
            raise ConfigError(f"{where}.{k}: must be a string, got {cfg[k]!r}")
    if "partial_reward" in cfg and not (_is_number(cfg["partial_reward"]) and 0 <= cfg["partial_reward"] < 1):
        raise ConfigError(f"{where}.partial_reward: must be a number in [0, 1) (the reward of an extracted but "
                          f"wrong answer; a score of 1 counts as correct), got {cfg['partial_reward']!r}")
    if "pass_threshold" in cfg and not (_is_number(cfg["pass_threshold"]) and cfg["pass_threshold"] == 1):
        raise ConfigError(f"{where}.pass_threshold: {cfg['pass_threshold']!r} is not supported: this version counts "
                          f"a score of 1 as correct (accuracy) and rewards the score itself; remove it (or set 1)")
    if "range" in cfg:
        r = cfg["range"]
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(map(_is_number, r)) and r[0] < r[1]):
            raise ConfigError(f"{where}.range: must be [low, high] with low < high, got {r!r}")
        if list(r) != [0, 1]:
            raise ConfigError(f"{where}.range: {list(r)!r} is not supported: the graders of this version score in "
                              f"[0, 1] (range is a score_model setting); remove it (or set [0, 1])")


def _take(cfg: Mapping, where: str, required: tuple, optional: tuple = ()) -> dict:
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConfigError(f"{where}: missing {missing} for type {cfg.get('type')!r}")
    unknown = set(cfg) - set(required) - set(optional) - _OPTIONAL - {"type"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} for type {cfg.get('type')!r}")
    _check_types(cfg, where)
    for k in ("input", "reference"):  # templates: a number failed at the first grade as a TypeError traceback
        if k in cfg and not isinstance(cfg[k], str):
            raise ConfigError(f"{where}.{k}: must be a template string such as \"{{{{item.answer}}}}\", got {cfg[k]!r}")
        try:  # what needs no item, at build time: `validate` without samples said ok to {{sample.output_txt}} (review)
            oa.check_template(cfg.get(k, ""))
        except KeyError as exc:
            raise ConfigError(f"{where}.{k}: {exc.args[0]}") from None
    return {k: cfg[k] for k in (*required, *optional) if k in cfg}


def _bindings(tree: ast.Module, name: str) -> int:
    """How many statements of the module's own scope (functions' and classes' bodies not entered) bind `name`."""
    count, todo = 0, list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            count += node.name == name
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id == name:
            count += 1
        elif isinstance(node, ast.alias) and (node.asname or node.name).split(".")[0] == name:
            count += 1
        elif isinstance(node, (ast.Lambda, ast.GeneratorExp, ast.ListComp, ast.SetComp, ast.DictComp)):
            continue  # (their own scopes)
        todo.extend(ast.iter_child_nodes(node))
    return count


def _check_source(source: Any, where: str, entry: str) -> None:
    if not isinstance(source, str):
        raise ConfigError(f"{where}: source must be a string")
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ConfigError(f"{where}: source does not parse: line {exc.lineno}: {exc.msg}") from exc
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == entry]
    if not defs:
        raise ConfigError(f"{where}: source must define {entry}(sample, item)")
    # the arguments are checked only when the name is bound by plain top-level defs: a decorator, a reassignment
    # (`grade = functools.partial(grade, ...)`) or a def under `if` may make a callable of another signature
    if _bindings(tree, entry) != len(defs) or defs[-1].decorator_list:
        return
    a = defs[-1].args  # (the last definition is the one called)
    positional = len(a.posonlyargs) + len(a.args)
    if (positional < 2 and a.vararg is None) or positional - len(a.defaults) > 2 or \
            any(d is None for d in a.kw_defaults):
        raise ConfigError(f"{where}: line {defs[-1].lineno}: {entry}() must take two arguments (sample, item); "
                          f"it is called as {entry}(sample, item)")


def build_grader(cfg: Mapping, pool: SandboxPool | None = None, where: str = "grader") -> Any:
    """Builds a grader from a config dict; raises ConfigError naming the config path."""
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise ConfigError(f"{where}: must be an object with a 'type'")
    kind = cfg["type"]
    try:
        if kind == "string_check":
            args = _take(cfg, where, ("input", "reference", "operation"))
            if args["operation"] not in ("eq", "ne", "like", "ilike"):
                raise ConfigError(f"{where}: operation must be eq, ne, like or ilike")
            return oa.StringCheckGrader(**args)
        if kind == "text_similarity":  # (cosine asks an embeddings endpoint: reftjax's endpoint keys are its own)
            cosine = cfg.get("evaluation_metric") == "cosine"
            args = _take(cfg, where, ("input", "reference", "evaluation_metric"),
                         ("model", *ENDPOINT_KEYS, "api_key") if cosine else ())
            if cosine:
                return build_cosine_grader(args, where)
            if args["evaluation_metric"] not in _METRICS:
                raise ConfigError(f"{where}: evaluation_metric {args['evaluation_metric']!r} is not "
                                  f"supported in this version (supported: {', '.join(_METRICS)}, cosine)")
            return oa.TextSimilarityGrader(**args)
        if kind == "python":
            args = _take(cfg, where, ("source",), ("image_tag",))
            _check_source(args["source"], where, "grade")
            return oa.SandboxedGrader(args["source"], "grade", pool=pool)
        if kind == "math_equiv":
            args = _take(cfg, where, ("input", "reference"))
            return oa.SandboxedGrader(oa.MATH_EQUIV_SOURCE, "equiv", args["input"], args["reference"], pool)
        if kind == "multi":
            args = _take(cfg, where, ("graders", "calculate_output"))
            return _build_multi(args, pool, where)
        if kind in ("reft", "gsm8k"):
            fields = {f.name for f in dataclasses.fields(ReftGrader)} - {"pool"}
            args = _take(cfg, where, (), tuple(fields))
            if kind == "gsm8k":
                args = {**GSM8K_FIELDS, **args}
            return ReftGrader(**args, pool=pool)
        if kind in ("score_model", "label_model"):
            return build_model_grader(cfg, where)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc
    raise ConfigError(f"{where}: unknown grader type {kind!r}")


def _build_multi(args: dict, pool: SandboxPool | None, where: str) -> oa.MultiGrader:
    graders = args["graders"]
    if not isinstance(graders, Mapping) or not graders:
        raise ConfigError(f"{where}.graders: must be a non-empty object of named graders")
    built = {name: build_grader(sub, pool, f"{where}.graders.{name}") for name, sub in graders.items()}
    if not isinstance(args["calculate_output"], str):
        raise ConfigError(f"{where}.calculate_output: must be a formula string such as \"0.5 * a + 0.5 * b\", "
                          f"got {args['calculate_output']!r}")
    try:
        return oa.MultiGrader(built, args["calculate_output"])  # (checks its formula)
    except SyntaxError as exc:
        raise ConfigError(f"{where}.calculate_output: does not parse: {exc.msg}") from exc
    except oa.ConfigError as exc:
        raise ConfigError(f"{where}.calculate_output: uses unknown names or operations "
                          f"(graders: {sorted(built)}): {exc}") from exc


def _leaves(grader, where: str = "grader"):
    """(config path, grader) of every grader that is not a `multi`, inside `multi` graders too."""
    if isinstance(grader, oa.MultiGrader):
        for name, sub in grader.graders.items():
            yield from _leaves(sub, f"{where}.graders.{name}")
    else:
        yield where, grader


def _sandboxed(grader):
    """(config path, grader) of every grader that runs programs in the sandbox (python, math_equiv, P-CoT ReFT)."""
    return [(where, g) for where, g in _leaves(grader) if getattr(g, "uses_sandbox", False)]


def reach_warnings(grader, where: str = "grader") -> list[str]:
    """One line per `multi` grader (nested ones too) whose formula can leave [0, 1] (`MultiGrader.reach_warning`),
    each naming its config path: logged at a run's start and printed by the grader CLI, since the clip is silent
    per sample."""
    if not isinstance(grader, oa.MultiGrader):
        return []
    out = [f"{where}: {w}"] if (w := grader.reach_warning()) else []
    for name, sub in grader.graders.items():
        out += reach_warnings(sub, f"{where}.graders.{name}")
    return out


_GUARDS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _guards(node) -> bool:
    """Whether an `except` type (or a `with` item, e.g. contextlib.suppress(ImportError)) names an ImportError."""
    names = {getattr(n, "id", getattr(n, "attr", None)) for n in ast.walk(node)
             if isinstance(n, (ast.Name, ast.Attribute))}
    return bool(names & _GUARDS)


def _unconditional_imports(body: list, top: bool = True) -> list:
    """The import statements a python grader runs whenever it is called: at module level and in `grade()`'s body,
    not under an `if`, a loop or a `try`/`with` that catches ImportError (a grader's fallback must not be refused),
    nor in other functions (maybe never called, or called under a guard); `__future__` imports skipped, `from m
    import *` checked as `import m` (a star import is refused inside a function). A miss costs the grader's own
    error count at the first batch; a false refusal would stop a run that works."""
    out = []
    for node in body:
        if isinstance(node, ast.Import):
            out.append(node)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__":
            star = any(a.name == "*" for a in node.names)
            out.append(ast.Import([ast.alias(node.module)]) if star else node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and top and node.name == "grade":
            out += _unconditional_imports(node.body, top=False)
        elif isinstance(node, ast.With) and not any(_guards(item.context_expr) for item in node.items):
            out += _unconditional_imports(node.body, top)
        elif isinstance(node, ast.Try):
            guarded = any(h.type is None or _guards(h.type) for h in node.handlers)
            out += _unconditional_imports(([] if guarded else node.body + node.orelse) + node.finalbody, top)
    return out


def check_imports(grader) -> None:
    """Starts the sandbox of every grader that runs programs (a `sandbox.preimport` the server refuses, one that
    loads sockets, zeroed every reward of the run), then runs each `python` grader's unconditional import
    statements once in it; raises ConfigError naming what fails. A job running as uid 65534 (the default when
    running as root) imports only what its server pre-imported, so an OpenAI-style grader's `import scipy`
    scored every sample 0 as a grader error."""
    for where, g in _sandboxed(grader):
        imports = _unconditional_imports(ast.parse(g.source).body) if getattr(g, "entry", "") == "grade" else []
        body = "".join(f"    {ast.unparse(n)}\n" for n in imports)
        pool = g.pool or default_pool()
        result = pool.run([SandboxJob(f"def grade():\n{body}    return 1\n", "grade")])[0]
        if not result.ok and (not imports or result.status == "sandbox_failure"):
            raise ConfigError(f"{where}: the sandbox cannot start: {result.status}: {result.error}")
        if not result.ok:
            raise ConfigError(f"{where}.source: its imports ({'; '.join(ast.unparse(n) for n in imports)}) fail in "
                              f"the sandbox ({result.status}: {result.error}); "
                              f"add the module to the sandbox's preimport list (the training config's "
                              f"sandbox.preimport, the grader CLI's --preimport)")


def check_wordnet(grader) -> None:
    """Loads WordNet for every METEOR grader (inside `multi` graders too) before a run loads anything: without nltk
    or WordNet's data every reward would be a grader error. Raises ConfigError naming the config path and how to
    install it."""
    for where, g in _leaves(grader):
        if isinstance(g, oa.TextSimilarityGrader) and g.evaluation_metric == "meteor":
            oa.wordnet(where)


def validate_grader(cfg: Mapping, item: Item | None = None, pool: SandboxPool | None = None) -> Any:
    """Builds the grader (no programs run) and checks it against a sample item's fields."""
    grader = build_grader(cfg, pool=pool)
    if item is not None:
        try:
            grader.validate(item)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"grader does not fit the sample item: {exc}") from exc
    return grader
