"""Prompt and target text in the ReFT authors' layout or a chat template.

Styles (``PromptConfig.style``):

* ``"reft"`` (N-CoT): prompt ``Question:\\n{question}\\nAnswer reasoning:\\n``,
  target ``{cot}\\nTherefore, the answer is: {answer}`` (authors'
  ``train_sft_model.py``; question, cot and answer are stripped).
* ``"reft-python"`` (P-CoT): same prompt; the SFT target is the program
  (``answer_cot``) alone, which already starts with
  ``def solution():\\n    \"\"\"{question}\"\"\"``. RL and evaluation force that
  start: ``response_prefix`` is ``def solution():\\n    \"\"\"{question}\"\"\"``
  with no trailing newline, exactly as ``train_rl_reft.py`` builds
  ``prefix_text`` (with SmolLM2's tokenizer a trailing ``\\n`` would split the
  ``"\\n   "`` token that the SFT targets contain, see BUILD_NOTES). The
  program to run is ``response_prefix + completion``.
* ``"chat"``: ``tokenizer.apply_chat_template(messages,
  add_generation_prompt=True)``; messages are the example's own (``openai``
  format) or one user turn holding the question; the target is the N-CoT text.
* ``"chat-python"`` (P-CoT for instruct models): the ``"chat"`` prompt, with the
  ``"reft-python"`` target and ``response_prefix`` (the assistant turn starts the
  program; the SFT target is the whole program, then the end-of-turn token).

The EOS token is appended at tokenization time, never here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import logging
import math
import threading

from reftjax.data.records import DataError, Example, strip_annotations

log = logging.getLogger(__name__)

STYLES = ("reft", "reft-python", "chat", "chat-python")
INSTRUCTION = "Question:\n"
COT_TRIGGER = "\nAnswer reasoning:\n"
ANSWER_TRIGGER = "\nTherefore, the answer is: "


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How examples become text.

    Attributes:
      style: one of `STYLES`.
      strip_annotations: drop GSM8K calculator annotations (``<<48/2=24>>``) from
        CoTs; they are calls to a calculator we do not run and add ~32% target tokens
        on GSM8K train with SmolLM2's tokenizer (mean 130 vs 99; BUILD_NOTES).
      system_prompt: chat styles only; None keeps the template's default system turn.
      bos: plain styles: start every prompt (SFT, RL, evaluation) with the tokenizer's BOS token. None: when the
        tokenizer's own encoding adds one (Llama-2/3, Mistral; not SmolLM2 or Qwen2), as transformers' generate
        on the exported policy would be prompted; False: never, as the ReFT authors (`add_special_tokens=False`;
        the `paper` preset). The chat styles take what their template writes.
      chat_template_kwargs: chat styles only: variables for the chat template (`apply_chat_template(**kwargs)`,
        TRL's `chat_template_kwargs`), e.g. ``{"enable_thinking": false}`` for Qwen3's template, which otherwise
        opens every reply for thinking. Given as a JSON object; held as sorted (name, value) pairs (hashable).
    """

    style: str = "reft"
    strip_annotations: bool = True
    system_prompt: str | None = None
    bos: bool | None = None
    chat_template_kwargs: tuple = ()

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.system_prompt is not None and not self.style.startswith("chat"):
            raise ValueError("system_prompt only applies to the chat styles ('chat', 'chat-python')")
        object.__setattr__(self, "chat_template_kwargs", _template_kwargs(self.chat_template_kwargs, self.style))

    @property
    def template_kwargs(self) -> dict:
        """`chat_template_kwargs` as the keyword arguments of `render_chat`."""
        return dict(self.chat_template_kwargs)


# `apply_chat_template`'s own parameters (transformers 4.56-5.25): not template variables
# (and whatever else the installed tokenizer's signature names: `check_template_kwargs`)
_RENDER_PARAMETERS = frozenset({"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                                "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                                "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
                                "messages", "sanitize_control_tokens"})


def _template_kwargs(value, style: str) -> tuple:
    """`data.prompt.chat_template_kwargs` (a JSON object, or (name, value) pairs) as sorted pairs, checked."""
    where = "data.prompt.chat_template_kwargs"
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise ValueError(f"{where}: expected an object such as {{\"enable_thinking\": false}}, got {value!r}")
    for name, v in pairs:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{where}: {name!r} is not a template variable name")
        if name in _RENDER_PARAMETERS:
            raise ValueError(f"{where}: {name!r} is apply_chat_template's own parameter, which reftjax sets")
        if (v is not None and not isinstance(v, (bool, int, float, str))) or (isinstance(v, float)
                                                                            and not math.isfinite(v)):
            raise ValueError(f"{where}: {name}={v!r}: values are true/false, finite numbers, strings or null")
    if pairs and not style.startswith("chat"):
        raise ValueError(f"{where} only applies to the chat styles ('chat', 'chat-python'), not {style!r}")
    if len({n for n, _ in pairs}) != len(pairs):
        raise ValueError(f"{where}: a name given twice in {value!r}")
    return tuple(sorted(pairs))


# Llama-3.x chat templates write today's date (`strftime_now`) into every prompt unless given `date_string`: a
# run's prompts (and the data digest a resume checks) changed at midnight (review, session 28). This is the
# templates' own fallback date.
CHAT_DATE = "26 Jul 2024"
_CLOCK_LOCK, _CLOCK_UNFIXED, _CLOCK_USERS = threading.Lock(), [], [0]
_RENDERING = threading.local()  # .depth: renders in progress on this thread (a render inside a render; review)


class _ChatClock(datetime.datetime):
    """The clock of transformers' chat templates while reftjax renders one: CHAT_DATE on the rendering thread, the
    real clock on every other (installed for the whole module, it dated other threads' renders too: review,
    session 34)."""

    @classmethod
    def now(cls, tz=None):
        if getattr(_RENDERING, "depth", 0):
            return datetime.datetime.strptime(CHAT_DATE, "%d %b %Y").replace(tzinfo=tz)
        return datetime.datetime.now(tz)


@contextlib.contextmanager
def _fixed_clock(template: str):
    """transformers' `strftime_now`, which templates such as Granite-3's and Mistral-Small-3's call directly (not
    through `date_string`), reads `datetime.now()` of `transformers.utils.chat_template_utils`: set to CHAT_DATE
    for this thread while such a template renders (`_ChatClock`, installed while any thread renders). A
    transformers without that module attribute renders today's date (logged)."""
    if "strftime_now" not in template:
        yield
        return
    module = importlib.import_module("transformers.utils.chat_template_utils")
    with _CLOCK_LOCK:
        if getattr(module, "datetime", None) not in (datetime.datetime, _ChatClock):
            if not _CLOCK_UNFIXED:  # (once)
                _CLOCK_UNFIXED.append(True)
                log.warning("this transformers' chat templates read the clock where reftjax cannot fix it: the "
                            "template's strftime_now writes today's date into the prompts, which differ from one day "
                            "to the next")
            fixed = False
        else:
            module.datetime, _CLOCK_USERS[0], fixed = _ChatClock, _CLOCK_USERS[0] + 1, True
    if not fixed:
        yield
        return
    _RENDERING.depth = getattr(_RENDERING, "depth", 0) + 1
    try:
        yield
    finally:
        _RENDERING.depth -= 1
        with _CLOCK_LOCK:
            _CLOCK_USERS[0] -= 1
            if not _CLOCK_USERS[0]:
                module.datetime = datetime.datetime


def template_text(tokenizer) -> str:
    """The tokenizer's chat template(s) as one text ('' without one): a named-template dict's templates joined."""
    template = getattr(tokenizer, "chat_template", None)
    return " ".join(template.values()) if isinstance(template, dict) else template if isinstance(template, str) else ""


def _rendering_template(tokenizer) -> str:
    """The template `apply_chat_template` renders without tools (of a dict of named ones, "default")."""
    try:
        return tokenizer.get_chat_template()
    except (AttributeError, TypeError, ValueError):  # a stand-in tokenizer, or none: all of the text
        return template_text(tokenizer)


def check_template_kwargs(tokenizer, cfg: PromptConfig) -> None:
    """Refuses a variable that is one of the installed `apply_chat_template`'s own parameters, and warns about one
    the model's chat template never names: a misspelt `enable_thinkng` changed nothing, silently, and a Qwen3 run
    went on thinking (regression review, session 38)."""
    import inspect

    names = [n for n, _ in cfg.chat_template_kwargs]
    try:
        own = set(inspect.signature(tokenizer.apply_chat_template).parameters)
    except (AttributeError, TypeError, ValueError):
        own = set()
    if taken := [n for n in names if n in own]:
        raise ValueError(f"data.prompt.chat_template_kwargs: {taken} are apply_chat_template's own parameters, "
                         "which reftjax sets")
    # the template reftjax renders (of named ones, "default": no tools are passed): a name only `tool_use` reads
    # changes none of its prompts (every named template was read; session 46)
    text = _rendering_template(tokenizer)
    if unread := [n for n in names if n not in text]:
        log.warning("data.prompt.chat_template_kwargs: the model's chat template never names %s: %s changes "
                    "nothing (a misspelling?)", unread, "it" if len(unread) == 1 else "they")


def render_chat(tokenizer, messages, **kwargs):
    """`tokenizer.apply_chat_template(messages, **kwargs)` with the date fixed to CHAT_DATE: `date_string` where the
    template reads one, and the clock of `strftime_now` where it calls that directly."""
    text = template_text(tokenizer)
    if "date_string" in text:
        kwargs = {"date_string": CHAT_DATE, **kwargs}
    with _fixed_clock(text):
        return tokenizer.apply_chat_template(messages, **kwargs)


def prompt_bos(tokenizer, cfg: PromptConfig) -> int | None:
    """The BOS id plain-style prompts start with (`PromptConfig.bos`), or None."""
    if cfg.style.startswith("chat") or cfg.bos is False:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if cfg.bos is None:  # what the tokenizer's own encoding puts before the text (a bos_token == unk fooled a probe
        # of the first id alone; regression review)
        full, text = tokenizer("1")["input_ids"], tokenizer("1", add_special_tokens=False)["input_ids"]
        return full[0] if len(full) > len(text) and full[1:1 + len(text)] == text else None
    if bos is None:
        raise DataError("data.prompt.bos=true: the tokenizer has no BOS token")
    return bos


@dataclasses.dataclass(frozen=True)
class Formatted:
    """Text of one example.

    Attributes:
      prompt: the context the model is conditioned on (SFT and RL alike).
      response_prefix: text forced at the start of the response in RL/eval
        (P-CoT program header), '' otherwise; ``target`` starts with it when the
        data agrees (37 of 3,043 SVAMP programs have a reworded docstring).
      target: SFT target without EOS, or None when the example has no reference CoT.
    """

    prompt: str
    response_prefix: str
    target: str | None


def reft_prompt(question: str) -> str:
    """The authors' plain prompt."""
    return f"{INSTRUCTION}{question.strip()}{COT_TRIGGER}"


def program_prefix(question: str) -> str:
    """The P-CoT response start used by the authors' RL/eval prompt."""
    return f'def solution():\n    """{question.strip()}"""'


def nl_target(ex: Example, strip: bool) -> str | None:
    """``cot + ANSWER_TRIGGER + answer``, or None without a CoT or an answer."""
    if not ex.cot.strip() or not ex.answer.strip():
        return None
    cot = strip_annotations(ex.cot) if strip else ex.cot
    return f"{cot.strip()}{ANSWER_TRIGGER}{ex.answer.strip()}"


def chat_messages(ex: Example, cfg: PromptConfig) -> list[dict[str, str]]:
    """The messages the chat template is applied to: an example's own messages (OpenAI format) or its question,
    after a system turn holding `cfg.system_prompt` when one is set and the messages have none (a `developer` turn,
    OpenAI's name for it, counts; `format_example` renames it `system` for templates that do not know the role)."""
    system = [] if cfg.system_prompt is None else [{"role": "system", "content": cfg.system_prompt}]
    if ex.messages is not None:
        own = [dict(m) for m in ex.messages]
        return own if any(m.get("role") in ("system", "developer") for m in own) else system + own
    return system + [{"role": "user", "content": ex.question}]


def format_example(ex: Example, cfg: PromptConfig, tokenizer=None) -> Formatted:
    """Prompt, response prefix and target for one example (``tokenizer`` for chat)."""
    if cfg.style.startswith("chat"):
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"data.prompt.style={cfg.style!r} needs a tokenizer with a chat template, and this "
                             f"model's has none: use a plain style ('reft' or 'reft-python') or a chat model")
        messages = chat_messages(ex, cfg)
        if "developer" not in _rendering_template(tokenizer):  # OpenAI's name for the system turn, unknown to the
            # template (of a dict of named templates, the one that renders: `in` read the dict's names; review)
            messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
        prompt = render_chat(tokenizer, messages, add_generation_prompt=True, tokenize=False, **cfg.template_kwargs)
    elif ex.messages is not None:
        raise DataError(f"{ex.at}: chat-format (openai) examples need data.prompt.style='chat'")
    else:
        prompt = reft_prompt(ex.question)
    if cfg.style.endswith("python"):  # P-CoT: the program, started by the response prefix in RL/eval
        return Formatted(prompt, program_prefix(ex.question), ex.cot.strip() or None)
    return Formatted(prompt, "", nl_target(ex, cfg.strip_annotations))
