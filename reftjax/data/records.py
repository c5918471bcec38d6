"""Raw examples and the readers of the three on-disk formats.

Every reader returns a list of `Example` and raises `DataError` with a message
``path:LINE: problem`` on the first bad record, so nothing half-read is ever
used. Formats:

* ``gsm8k-jsonl``: OpenAI's GSM8K files, one ``{"question", "answer"}`` object
  per line; the answer is a chain of thought with calculator annotations
  (``<<48/2=24>>``) ending in ``#### N``.
* ``reft``: the ReFT authors' JSON list of ``{"item_id", "question",
  "answer_cot"?, "answer_value"}`` (test sets have no ``answer_cot``). Line
  numbers are those of each object's opening brace in the file.
* ``openai``: OpenAI RFT-style JSONL, each line ``{"messages": [...], ...}``
  whose last message is from the user; every other field is kept verbatim in
  `Example.fields` for graders (``{{item.field}}``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

FORMATS = ("gsm8k-jsonl", "reft", "openai")
_ANNOTATION = re.compile(r"<<[^<>]*>>")
# a gold number: ASCII digits, commas only between thousands groups, an optional fraction and exponent (what JSON
# numbers print as); `float` alone took "3,5" as 35 once the commas were dropped, "1_000" and non-ASCII digits
_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


class DataError(ValueError):
    """Bad input data; the message starts with ``path:LINE:``."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem, whatever file it came from.

    Attributes:
      idx: position in its split (0-based); batches carry it as ``example_idx``.
      item_id: stable identifier (``gsm8k_train_12``, the authors' ``svamp_3``...).
      question: the problem statement, stripped.
      cot: reference reasoning without the final-answer line ('' when absent):
        natural language (N-CoT) or a Python program (P-CoT).
      answer: the gold answer as text (commas removed for numbers), '' if none.
      answer_value: ``float(answer)`` when numeric, else None.
      messages: chat messages (``openai`` format) or None.
      fields: extra reference fields for graders (``openai`` format).
      where: ``path:line`` it was read from ('' for a built-in dataset); for error messages, not compared.
    """

    idx: int
    item_id: str
    question: str
    cot: str = ""
    answer: str = ""
    answer_value: float | None = None
    messages: tuple[dict[str, str], ...] | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    where: str = dataclasses.field(default="", compare=False)

    @property
    def at(self) -> str:
        """Where an error about it points: `path:line (item_id)`, or the item_id of a built-in dataset's example."""
        return f"{self.where} ({self.item_id})" if self.where else self.item_id


def parse_number(text: str, where: str) -> float:
    """``float`` of a gold answer such as ``'1,080'`` or ``'-3.5'``; DataError otherwise (``'3,5'``: commas
    separate thousands only)."""
    if not _NUMBER.fullmatch(text.strip()):
        hint = " (commas separate thousands only: 1,234)" if "," in text else ""
        raise DataError(f"{where}: gold answer {text!r} is not a number{hint}")
    value = float(text.replace(",", "").strip())
    if not math.isfinite(value):
        raise DataError(f"{where}: gold answer {text!r} is not finite")
    return value


def strip_annotations(cot: str) -> str:
    """Remove GSM8K calculator annotations: ``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``."""
    return _ANNOTATION.sub("", cot)


def split_gsm8k_answer(answer: str, where: str) -> tuple[str, str]:
    """Split a GSM8K answer field into (cot, final answer without commas)."""
    cot, sep, final = answer.rpartition("####")
    if not sep:
        raise DataError(f"{where}: answer has no '#### N' line")
    if "####" in cot:  # (the last was the gold, the first trained on inside the chain of thought; review)
        raise DataError(f"{where}: answer has {answer.count('####')} '####' markers; one '#### N' line ends it")
    final = final.strip()
    if not final:
        raise DataError(f"{where}: empty answer after '####'")
    parse_number(final, where)
    return cot.strip(), final.replace(",", "")


def _require_str(obj: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: empty field {key!r}")
    return value


def _open_data(path: str):
    """``open(path, "rb")``, with a missing file or a folder as a ``path:0:`` DataError."""
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "file not found"
        raise DataError(f"{path}:0: {what}")
    return open(path, "rb")


def jsonl_objects(path: str):
    """Yield (line_number, dict) for each non-blank line of a JSONL file."""
    with _open_data(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def gsm8k_record(obj: dict, where: str) -> dict[str, str]:
    """Validate one GSM8K object; returns question, cot, answer (strings)."""
    question = _require_str(obj, "question", where).strip()
    cot, final = split_gsm8k_answer(_require_str(obj, "answer", where), where)
    return {"question": question, "cot": cot, "answer": final}


def read_gsm8k_jsonl(path: str | os.PathLike, split: str = "file") -> list[Example]:
    """Read an OpenAI GSM8K JSONL file (``train.jsonl``/``test.jsonl``)."""
    path = os.fspath(path)
    out = []
    for lineno, obj in jsonl_objects(path):
        rec = gsm8k_record(obj, f"{path}:{lineno}")
        out.append(Example(len(out), f"gsm8k_{split}_{len(out)}", rec["question"], rec["cot"],
                           rec["answer"], float(rec["answer"]), where=f"{path}:{lineno}"))
    _require_nonempty(out, path)
    return out


def _json_list_with_lines(text: str, path: str) -> list[tuple[int, Any]]:
    """Parse a JSON list, returning (1-based line of each element's start, element)."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text).end()
    if not text.startswith("[", pos):
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected a JSON list of "
                        "objects (ReFT format)")
    out, line, counted = [], 1, 0
    pos = ws.match(text, pos + 1).end()
    while not text.startswith("]", pos):
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        out.append((line, obj))
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
            if text.startswith("]", pos):
                raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: malformed JSON (trailing ',')")
        elif not text.startswith("]", pos):
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: malformed JSON "
                            "(expected ',' or ']')")
    end = ws.match(text, pos + 1).end()
    if end < len(text):  # e.g. two files joined with cat: the second list would be ignored
        raise DataError(f"{path}:{text.count(chr(10), 0, end) + 1}: extra data after the JSON list")
    return out


def read_reft_json(path: str | os.PathLike, *, require_cot: bool = False,
                   numeric: bool = True) -> list[Example]:
    """Read a ReFT-authors JSON file (N-CoT, P-CoT or a test set without CoT).

    Args:
      require_cot: every record must have a non-empty ``answer_cot`` (training sets).
      numeric: ``answer_value`` must be a number (False for MathQA's letter choices).
    """
    path = os.fspath(path)
    with _open_data(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if text.startswith("\ufeff"):  # (read as "expected a JSON list of objects", which the file is)
        raise DataError(f"{path}:1: starts with a UTF-8 byte order mark (BOM); save it as UTF-8 without one")
    items = _json_list_with_lines(text, path)
    out = []
    for i, (line, obj) in enumerate(items):
        where = f"{path}:{line}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        question = _require_str(obj, "question", where).strip()
        item_id = _require_str(obj, "item_id", where).strip()
        answer = _require_str(obj, "answer_value", where).strip()
        cot = ""
        if require_cot or "answer_cot" in obj:
            cot = _require_str(obj, "answer_cot", where).strip()
        if numeric:
            try:
                value = parse_number(answer, where)
            except DataError as exc:  # (a MathQA file stopped here with no way forward; review, session 29)
                raise DataError(f"{exc}; multiple-choice answers (MathQA's letters) are read as text when the grader "
                                f"has answer_type \"mathqa\" (--set grader='{{\"type\": \"reft\", "
                                f"\"answer_type\": \"mathqa\"}}')") from None
            answer = answer.replace(",", "")
        else:
            value = None
        out.append(Example(i, item_id, question, cot, answer, value, where=where))
    _require_nonempty(out, path)
    return out


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's (function: deprecated)


def read_openai_jsonl(path: str | os.PathLike, *, answer_field: str | None = None) -> list[Example]:
    """Read an RFT-style JSONL file (`messages` + reference fields); ``answer_field`` (if set) must hold a number.
    A row without `messages` may give them as TRL's conversational `prompt` (the same list of chat messages); its
    other fields are the item's, as OpenAI's are."""
    path = os.fspath(path)
    out = []
    for lineno, obj in jsonl_objects(path):
        where = f"{path}:{lineno}"
        # (a table with both columns has null cells: a null `messages` beside a `prompt` list reads the list)
        key = "messages" if obj.get("messages") is not None or not isinstance(obj.get("prompt"), list) else "prompt"
        messages = obj.get(key)
        if messages is None:
            hint = (": TRL's text `prompt` (the standard format) has no roles: give it as `messages`, "
                    "[{\"role\": \"user\", \"content\": ...}]") if isinstance(obj.get("prompt"), str) else \
                " (a list of chat messages; TRL's conversational `prompt` list is read as one)"
            raise DataError(f"{where}: missing field 'messages'{hint}")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: {key!r} must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: each message needs string 'role' and 'content'")
            if m["role"] not in CHAT_ROLES:  # a typo ("assitant") went into the chat template as it stood (review)
                raise DataError(f"{where}: unknown message role {m['role']!r}; expected one of {list(CHAT_ROLES)}")
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the last message must be from the user")
        if not messages[-1]["content"].strip():  # (the other readers refuse an empty question too; review)
            raise DataError(f"{where}: the last (user) message is empty")
        fields = {k: v for k, v in obj.items() if k != key and not (key == "prompt" and k == "messages")}
        answer, value = "", None
        if answer_field is not None:
            raw = _dotted(fields, answer_field)
            if raw is None or not str(raw).strip():
                raise DataError(f"{where}: missing or empty field {answer_field!r}")
            try:
                value = parse_number(str(raw), where)
            except DataError as exc:  # (said nothing of the setting that asked for a number; review)
                raise DataError(f"{exc}; data.answer_field={answer_field!r} reads a numeric gold answer: leave it "
                                f"unset for text references (graders read them as {{{{item.{answer_field}}}}})") \
                    from None
            answer = str(raw).strip().replace(",", "")
        item_id = fields.get("item_id")  # (a null one was named "None"; bad-input review, session 35's list)
        out.append(Example(len(out), f"item_{len(out)}" if item_id is None else str(item_id),
                           messages[-1]["content"].strip(), "", answer, value,
                           tuple(dict(m) for m in messages), fields, where))
    _require_nonempty(out, path)
    return out


def _dotted(fields: dict, name: str):
    """`fields[name]`, or for a dotted name the nested field (`ref.value`: fields["ref"]["value"]) as the graders
    read it (`graders.base.field`); None when missing."""
    from reftjax.graders.base import field

    if name in fields:
        return fields[name]
    try:
        return field(fields, name)
    except KeyError:
        return None


def _require_nonempty(examples: list, path: str) -> None:
    if not examples:
        raise DataError(f"{path}:1: no examples in file")


def read_file(path: str | os.PathLike, fmt: str, **kwargs) -> list[Example]:
    """Dispatch on ``fmt`` (one of `FORMATS`)."""
    readers = {"gsm8k-jsonl": read_gsm8k_jsonl, "reft": read_reft_json, "openai": read_openai_jsonl}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return readers[fmt](os.fspath(path), **kwargs)
