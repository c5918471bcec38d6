"""A procedurally generated multi-step arithmetic word-problem task and its tiny tokenizer.

Each problem tracks one quantity through `n_steps` operations (add with a carry,
subtract with a borrow, double or triple), with distractor sentences that carry
irrelevant numbers. The gold chain of thought has one line per operation in the
ReFT N-CoT target layout::

    Question:
    Mia has 47 pens. Sam is 9 years old. She buys 38 more. She gives away 29.
    How many pens does Mia have?
    Answer reasoning:
    47+38=85
    85-29=56
    Therefore, the answer is: 56

Splits (`make_splits`) come from one generator with disjoint seeds; problems
whose question text appears in the training split are removed from the held-out
splits. The "hard" split has one more step than the most seen in training.

The tokenizer is a real `transformers.PreTrainedTokenizerFast` over a closed
word-level vocabulary (every word the generator can emit, single digits with and
without a leading space, punctuation): words keep their leading space and the
`Fuse` decoder concatenates pieces, so `decode(encode(text)) == text` exactly and
the ReFT grader sees the same string a character model would produce.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Sequence

from reftjax.graders.reft import reft_target

PROMPT_TEMPLATE = "Question:\n{question}\nAnswer reasoning:\n"
NAMES = (("Tom", "He"), ("Sam", "He"), ("Ben", "He"), ("Leo", "He"),
         ("Mia", "She"), ("Ann", "She"), ("Zoe", "She"), ("Eva", "She"))
ITEMS = ("apples", "pens", "cards", "coins", "books", "eggs", "shells", "stamps")
ADD_VERBS = ("buys {x} more", "finds {x} more", "gets {x} more")
SUB_VERBS = ("gives away {x}", "loses {x}", "sells {x}")
MUL_VERBS = {2: "doubles them", 3: "triples them"}
DISTRACTORS = ("{n} is {d} years old", "The shop is {d} miles away", "{n} has {d} friends",
               "The bus leaves at {d}", "{n} reads {d} pages")
MAX_VALUE = 999
SPECIALS = ("<pad>", "<eos>", "<unk>")
_PIECE_PATTERN = r"\n| ?[A-Za-z]+| ?[0-9]|[.,:?+*=-]| "


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Generator settings.

    Attributes:
      min_steps, max_steps: operations per training/validation/test problem (inclusive).
      max_distractors: irrelevant sentences per problem (0..max_distractors).
      mul_prob: chance that an operation is a doubling/tripling (when the value allows it).
      operand_digits: digits of the added/subtracted operands (1 or 2); every addition
        carries and every subtraction borrows in the units digit.
      cot_order: "text" (the gold CoT applies the operations in the order the question
        states them: one valid trace per problem) or "random" (the gold CoT applies them in
        a random order, fixed per problem, whose running values stay in 0..MAX_VALUE: every
        order reaches the same answer, so each problem has several valid traces and the
        training data shows one of them, as GSM8K's single annotation does). Needs mul_prob 0
        (doubling does not commute with adding); the carry/borrow property is only
        guaranteed in text order.
    """

    min_steps: int = 2
    max_steps: int = 3
    max_distractors: int = 1
    mul_prob: float = 0.0
    operand_digits: int = 1
    cot_order: str = "text"

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_distractors < 0 or not 0 <= self.mul_prob <= 1:
            raise ValueError("max_distractors must be >= 0 and mul_prob in [0, 1]")
        if self.operand_digits not in (1, 2):
            raise ValueError(f"operand_digits must be 1 or 2, got {self.operand_digits}")
        if self.cot_order not in ("text", "random"):
            raise ValueError(f"cot_order must be 'text' or 'random', got {self.cot_order!r}")
        if self.cot_order == "random" and self.mul_prob:
            raise ValueError("cot_order='random' needs mul_prob=0: doubling/tripling does not commute")


def _tens(digits: int) -> range:
    return range(1, 10) if digits == 2 else range(1)


def _add_operand(rng: random.Random, value: int, digits: int) -> int | None:
    """An x of `digits` digits with a units carry (value%10 + x%10 >= 10) and value + x <= MAX_VALUE."""
    units = [u for u in range(1, 10) if value % 10 + u >= 10]
    options = [t * 10 + u for t in _tens(digits) for u in units if value + t * 10 + u <= MAX_VALUE]
    return rng.choice(options) if options else None


def _sub_operand(rng: random.Random, value: int, digits: int) -> int | None:
    """An x < value of `digits` digits that needs a units borrow (x%10 > value%10)."""
    options = [t * 10 + u for t in _tens(digits) for u in range(value % 10 + 1, 10) if t * 10 + u < value]
    return rng.choice(options) if options else None


def _operation(rng: random.Random, value: int, mul_prob: float, digits: int) -> tuple[str, int, str] | None:
    """(symbol, operand, verb phrase) of one step, or None when no operation fits."""
    if rng.random() < mul_prob:
        k = rng.choice((2, 3))
        if value * k <= MAX_VALUE:
            return "*", k, MUL_VERBS[k]
    kinds = ["+", "-"]
    rng.shuffle(kinds)
    for kind in kinds:
        x = _add_operand(rng, value, digits) if kind == "+" else _sub_operand(rng, value, digits)
        if x is not None:
            verbs = ADD_VERBS if kind == "+" else SUB_VERBS
            return kind, x, rng.choice(verbs).format(x=x)
    return None


def _apply(value: int, sym: str, x: int) -> int:
    return value + x if sym == "+" else value - x if sym == "-" else value * x


def _cot_lines(start: int, ops: Sequence[tuple[str, int]]) -> list[str] | None:
    """`a+x=b` lines applying `ops` from `start`, or None when a running value leaves 0..MAX_VALUE."""
    value, lines = start, []
    for sym, x in ops:
        new = _apply(value, sym, x)
        if not 0 <= new <= MAX_VALUE:
            return None
        lines.append(f"{value}{sym}{x}={new}")
        value = new
    return lines


def _random_order_lines(rng: random.Random, start: int, ops: list[tuple[str, int]]) -> list[str]:
    """The CoT of a uniformly random valid order of `ops` (+/- only; the text order is always valid)."""
    orders = []
    for perm in itertools.permutations(range(len(ops))):
        lines = _cot_lines(start, [ops[i] for i in perm])
        if lines is not None:
            orders.append(lines)
    return rng.choice(orders)


def generate_problem(rng: random.Random, n_steps: int, max_distractors: int = 1,
                     mul_prob: float = 0.0, digits: int = 1, cot_order: str = "text") -> dict:
    """One problem: {"question", "answer_cot", "answer_value", "n_steps"}."""
    (name, pronoun), item = rng.choice(NAMES), rng.choice(ITEMS)
    start = value = rng.randint(11, 99)
    sentences, lines, ops = [f"{name} has {value} {item}"], [], []
    for _ in range(n_steps):
        op = None
        while op is None:
            op = _operation(rng, value, mul_prob, digits)
            if op is None:  # stuck (e.g. 999): restart the quantity
                return generate_problem(rng, n_steps, max_distractors, mul_prob, digits, cot_order)
        sym, x, phrase = op
        new = _apply(value, sym, x)
        sentences.append(f"{pronoun} {phrase}")
        lines.append(f"{value}{sym}{x}={new}")
        ops.append((sym, x))
        value = new
    others = [n for n, _ in NAMES if n != name]
    for _ in range(rng.randint(0, max_distractors)):
        text = rng.choice(DISTRACTORS).format(n=rng.choice(others), d=rng.randint(2, 99))
        sentences.insert(rng.randint(1, len(sentences)), text)
    question = ". ".join(sentences) + f". How many {item} does {name} have?"
    if cot_order == "random":  # own RNG, keyed by the question: same questions as the text-order task
        lines = _random_order_lines(random.Random(question), start, ops)
    # the arithmetic alone (start and the operations in any order): names, items, verbs and distractors aside, two
    # problems with the same key have the same answer and interchangeable gold traces (used to keep splits apart)
    key = f"{start}:" + ",".join(sorted(f"{sym}{x}" for sym, x in ops))
    return {"question": question, "answer_cot": "\n".join(lines), "answer_value": str(value), "n_steps": n_steps,
            "key": key}


def generate_split(n: int, seed: int, cfg: TaskConfig, n_steps: int | None = None,
                   exclude: set[str] | frozenset = frozenset()) -> list[dict]:
    """`n` distinct problems, none whose arithmetic `key` is in `exclude`; fixed `n_steps` or cfg's range."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        steps = n_steps if n_steps is not None else rng.randint(cfg.min_steps, cfg.max_steps)
        p = generate_problem(rng, steps, cfg.max_distractors, cfg.mul_prob, cfg.operand_digits, cfg.cot_order)
        if p["question"] not in seen and p["key"] not in exclude:
            seen.add(p["question"])
            out.append(p)
    return out


def make_splits(cfg: TaskConfig, n_train: int, n_val: int, n_test: int, n_hard: int,
                seed: int = 0) -> dict[str, list[dict]]:
    """train / val / test from cfg's step range, hard with `cfg.max_steps + 1` steps; all disjoint (val and test
    share no arithmetic `key` with train or each other; hard differs in its step count)."""
    # disjoint by arithmetic, not only by text: 16-18% of val/test repeated a training problem's start and operations
    # under other names, items or distractors (same answer; helper review, session 20)
    train = generate_split(n_train, seed * 1000 + 1, cfg)
    used = {p["key"] for p in train}
    val = generate_split(n_val, seed * 1000 + 2, cfg, exclude=used)
    used |= {p["key"] for p in val}
    test = generate_split(n_test, seed * 1000 + 3, cfg, exclude=used)
    hard = generate_split(n_hard, seed * 1000 + 4, cfg, n_steps=cfg.max_steps + 1)
    return {"train": train, "val": val, "test": test, "hard": hard}


def prompt_text(problem: dict) -> str:
    return PROMPT_TEMPLATE.format(question=problem["question"])


def target_text(problem: dict) -> str:
    """The ReFT N-CoT target: cot + "\\nTherefore, the answer is: " + answer."""
    return reft_target(problem["answer_cot"], problem["answer_value"])


def vocabulary() -> list[str]:
    """Every piece the generator, prompt template and answer trigger can produce (specials first)."""
    words = {"Question", "Answer", "reasoning", "Therefore", "the", "answer", "is", "How", "many", "does",
             "have", "has", "more", "away", "them", "years", "old", "The", "shop", "miles", "friends",
             "bus", "leaves", "at", "reads", "pages", "doubles", "triples"}
    words |= {n for n, _ in NAMES} | {p for _, p in NAMES} | set(ITEMS)
    for phrase in ADD_VERBS + SUB_VERBS:
        words.add(phrase.split()[0])
    words.add("gives")
    pieces = sorted(words | {" " + w for w in words})
    digits = [str(d) for d in range(10)] + [f" {d}" for d in range(10)]
    punct = ["\n", ".", ",", ":", "?", "+", "-", "*", "=", " "]
    return list(SPECIALS) + punct + digits + pieces


def build_tokenizer():
    """A `PreTrainedTokenizerFast` over `vocabulary()` (pad 0, eos 1, unk 2; no BOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: i for i, piece in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
