"""Tokenization into ragged id arrays, then fixed-shape bucketed NumPy batches.

Prompt and target are encoded separately and concatenated (as the ReFT authors
do), so the boundary between them is exact and the loss mask needs no
offset mapping. Padded lengths are always one of `TokenizeConfig` buckets, so a
jitted step compiles once per bucket.

Batch layouts (all int32 except the bool masks; B rows):

* prompts (RL/eval): ``prompt_tokens [B, P]`` left-padded with ``pad_id``,
  ``prompt_mask [B, P]`` True on real tokens;
* SFT: ``tokens [B, T]`` = prompt + target + EOS (in the chat styles the template's end-of-turn token,
  `end_of_turn_id`), right-padded;
  ``attn_mask [B, T]`` True on real tokens; ``loss_mask [B, T]`` True on the
  target tokens and the EOS (position t is scored by the logits at t - 1).

Both carry ``example_idx [B]`` (index in the example list, -1 for padding rows)
and ``valid [B]``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np

from reftjax.data.prompts import PromptConfig, check_template_kwargs, format_example, prompt_bos, render_chat
from reftjax.data.records import DataError, Example

TRUNCATION = ("drop", "truncate", "error")


def power_of_two_buckets(limit: int, smallest: int) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``limit``, then ``limit`` itself."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return (*sizes, limit)


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Length limits, buckets and the truncation policy.

    Attributes:
      max_prompt_len: longest prompt (incl. any response prefix) in tokens;
        300 as in the authors' RL runs.
      max_target_len: longest SFT target incl. EOS; prompt + target <= 700 by default.
      prompt_buckets: padded prompt lengths; None = powers of two from
        ``min_bucket`` up to ``max_prompt_len``.
      seq_buckets: padded SFT lengths; None = powers of two up to
        ``max_prompt_len + max_target_len``.
      min_bucket: smallest automatic bucket.
      truncation: "drop" (skip over-long examples, counted), "truncate" (prompt
        keeps its last tokens, target its first, losing the EOS; counted) or "error".
    """

    max_prompt_len: int = 300
    max_target_len: int = 400
    prompt_buckets: tuple[int, ...] | None = None
    seq_buckets: tuple[int, ...] | None = None
    min_bucket: int = 64
    truncation: str = "drop"

    def __post_init__(self):
        if self.max_prompt_len <= 0 or self.max_target_len <= 0 or self.min_bucket <= 0:
            raise ValueError("lengths and min_bucket must be positive")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION}, got {self.truncation!r}")
        for name, top in (("prompt_buckets", self.max_prompt_len),
                          ("seq_buckets", self.max_prompt_len + self.max_target_len)):
            b = getattr(self, name)
            if b is not None and (not b or list(b) != sorted(set(b)) or b[-1] < top):  # ([]: an IndexError)
                raise ValueError(f"{name} must be strictly increasing and reach {top}, got {b}")

    @property
    def prompt_sizes(self) -> tuple[int, ...]:
        return self.prompt_buckets or power_of_two_buckets(self.max_prompt_len, self.min_bucket)

    @property
    def seq_sizes(self) -> tuple[int, ...]:
        return self.seq_buckets or power_of_two_buckets(
            self.max_prompt_len + self.max_target_len, self.min_bucket)


@dataclasses.dataclass(frozen=True)
class TokenizedDataset:
    """Ragged token ids of kept examples (entry i is example ``example_idx[i]``).

    Attributes:
      prompt: context ids per example.
      prefix: forced response-prefix ids (empty unless P-CoT).
      target: target ids + EOS per example, or None for prompt-only data.
      example_idx: position of each kept example in the list passed to `tokenize_examples` (what
        `items[example_idx]` looks up), whatever its `Example.idx`.
      pad_id: padding token id.
      config: the `TokenizeConfig` used.
      stats: counts: ``examples``, ``kept``, ``dropped``, ``prompt_truncated``,
        ``target_truncated``.
    """

    prompt: list[np.ndarray]
    prefix: list[np.ndarray]
    target: list[np.ndarray] | None
    example_idx: np.ndarray
    pad_id: int
    config: TokenizeConfig
    stats: dict[str, int]

    def __len__(self) -> int:
        return len(self.prompt)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the token ids (prompts, prefixes, targets) and example indices: a resumed run checks that
        its data is the data it was started on (a file edited in place may keep the example count)."""
        h = hashlib.blake2b(digest_size=8)
        for arrays in (self.prompt, self.prefix, self.target if self.target is not None else ()):
            for a in arrays:
                h.update(np.asarray(a, np.int64).tobytes())
                h.update(b"|")
            h.update(b"#")
        h.update(np.asarray(self.example_idx, np.int64).tobytes())
        return h.hexdigest()

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.array([len(p) + len(q) for p, q in zip(self.prompt, self.prefix)], np.int64)

    @property
    def seq_lengths(self) -> np.ndarray:
        if self.target is None:
            raise ValueError("dataset was tokenized without targets")
        return np.array([len(p) + len(t) for p, t in zip(self.prompt, self.target)], np.int64)


def encode_texts(tokenizer, texts: list[str], split_special_tokens: bool = True) -> list[np.ndarray]:
    """Batch-encode without adding special tokens. Text that spells one (`<|im_end|>` in a question or a chain of
    thought) stays text unless `split_special_tokens=False`, for a chat template's rendering, whose own are real.
    A tokenizer that refuses the option (transformers' MistralCommonBackend: "does not support ...
    `split_special_tokens`", though it has the attribute) is called without it: mistral-common reads no control
    tokens from text."""
    if len(texts) == 0:
        return []
    texts = list(texts)
    try:
        ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]
    except ValueError as e:
        if "split_special_tokens" not in str(e):
            raise
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, np.int32) for x in ids]


def special_token_strings(tokenizer) -> list[str]:
    """The strings the tokenizer turns into special (control) tokens, longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}
    return sorted((t for t in strings if t), key=len, reverse=True)


def check_no_special_tokens(examples: list[Example], tokenizer) -> None:
    """Refuses chat-style examples whose text spells a special token: the chat template's rendering is encoded with
    its control tokens live, so a question holding `<|im_end|>\n<|im_start|>assistant\n...` would forge turns."""
    specials = special_token_strings(tokenizer)
    for ex in examples:
        texts = [m.get("content") or "" for m in ex.messages] if ex.messages is not None else [ex.question]
        for text in texts:
            hits = [(text.index(t), -len(t), t) for t in specials if t in text] if isinstance(text, str) else []
            if hits:
                hit = min(hits)[2]  # the first in the text
                raise DataError(f"{ex.at}: its text holds {hit!r}, a special token of this tokenizer; with a "
                                f"chat style it would be a control token in the prompt (a forged turn), so remove it "
                                f"from the data or use a plain style (data.prompt.style='reft')")


def end_of_turn_id(tokenizer, **template_kwargs) -> int:
    """The special token the chat template puts right after an assistant reply (`<|im_end|>`, Llama-3's
    `<|eot_id|>`), which chat-style SFT targets end with; the EOS token when the template puts none there.
    `template_kwargs`: the run's `PromptConfig.template_kwargs`."""
    mark = "reftjaxEndOfTurnProbe"
    try:
        text = render_chat(tokenizer, [{"role": "user", "content": "1"}, {"role": "assistant", "content": mark}],
                           tokenize=False, **template_kwargs)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation: no better answer than EOS
        return tokenizer.eos_token_id
    if mark not in text:
        return tokenizer.eos_token_id
    tail = text[text.rindex(mark) + len(mark):]
    special = set(tokenizer.all_special_ids) | {i for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {})
                                                .items() if getattr(t, "special", False)}
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    return next((i for i in ids if i in special), tokenizer.eos_token_id)


def _formatted(ex: Example, prompt_cfg: PromptConfig, tokenizer):
    """`format_example`, with a chat template's refusal of the example (Mistral's "roles must alternate" for a system
    turn) naming the example's file and line: it was a bare jinja2 traceback (review, session 35)."""
    from jinja2.exceptions import TemplateError

    try:
        return format_example(ex, prompt_cfg, tokenizer)
    except TemplateError as e:
        raise DataError(f"{ex.at}: the model's chat template refused this example: {e}") from None


def tokenize_examples(examples: list[Example], tokenizer, prompt_cfg: PromptConfig,
                      cfg: TokenizeConfig, *, with_targets: bool = True) -> TokenizedDataset:
    """Format, batch-encode and length-filter examples.

    Args:
      with_targets: True for SFT (every example must have a reference target).
    """
    if prompt_cfg.chat_template_kwargs:
        check_template_kwargs(tokenizer, prompt_cfg)
    formatted = [_formatted(e, prompt_cfg, tokenizer) for e in examples]
    if with_targets:
        for e, f in zip(examples, formatted):
            if f.target is None:
                raise DataError(f"{e.at}: no reference CoT/answer to train on (SFT); data without one can "
                                "train with RL alone (sft.epochs=0)")
            if prompt_cfg.style.endswith("python") and not f.target.lstrip().startswith("def solution"):
                # (GSM8K's CoT is prose: its "programs" were a SyntaxError for every gold target, and RL forces the
                # program header on a model that learnt prose: no reward could ever be earned; review, session 27)
                raise DataError(f"{e.at}: data.prompt.style={prompt_cfg.style!r} trains on P-CoT programs "
                                f"('def solution(): ...'), but this example's reference CoT is not one "
                                f"({f.target[:40]!r}...): GSM8K's and other N-CoT data's CoT is prose; train on a "
                                f"P-CoT file (the ReFT authors' format, data.train_file) or with RL alone "
                                f"(sft.epochs=0)")
    chat = prompt_cfg.style.startswith("chat")
    if chat:
        check_no_special_tokens(examples, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # the reply's last token: the template's end of turn in the chat styles (Llama-3: <|eot_id|>, not <|end_of_text|>)
    eos = end_of_turn_id(tokenizer, **prompt_cfg.template_kwargs) if chat else tokenizer.eos_token_id
    prompts = encode_texts(tokenizer, [f.prompt for f in formatted], split_special_tokens=not chat)
    prefixes = encode_texts(tokenizer, [f.response_prefix for f in formatted])
    targets = None
    if with_targets:
        eos_arr = np.asarray([eos], np.int32)
        targets = [np.concatenate([t, eos_arr])
                   for t in encode_texts(tokenizer, [f.target for f in formatted])]
    return _apply_limits(examples, prompts, prefixes, targets, int(pad), cfg, prompt_bos(tokenizer, prompt_cfg))


def _apply_limits(examples, prompts, prefixes, targets, pad_id, cfg, bos=None) -> TokenizedDataset:
    """Length limits; a `bos` starts every prompt and counts in `max_prompt_len` (a truncated prompt keeps it)."""
    if bos is not None:
        prompts = [np.concatenate([np.asarray([bos], np.int32), p]) for p in prompts]
    stats = dict(examples=len(examples), kept=0, dropped=0, prompt_truncated=0, target_truncated=0)
    keep_p, keep_q, keep_t, keep_idx = [], [], [] if targets is not None else None, []
    for i, ex in enumerate(examples):
        p, q = prompts[i], prefixes[i]
        t = None if targets is None else targets[i]
        long_p = len(p) + len(q) > cfg.max_prompt_len
        long_t = t is not None and len(t) > cfg.max_target_len
        if (long_p or long_t) and cfg.truncation == "error":
            raise DataError(f"{ex.at}: prompt {len(p) + len(q)} / target "
                            f"{0 if t is None else len(t)} tokens exceed the limits "
                            f"{cfg.max_prompt_len} / {cfg.max_target_len}")
        if (long_p or long_t) and cfg.truncation == "drop":
            stats["dropped"] += 1
            continue
        if long_p:
            head = p[:1] if bos is not None else p[:0]  # (the BOS stays first)
            keep = cfg.max_prompt_len - len(q) - len(head)
            if keep <= 0:  # nothing of the question would be left (a P-CoT program header is the question):
                stats["dropped"] += 1  # dropped and counted, as with truncation="drop" (it stopped the whole run)
                continue
            p, stats["prompt_truncated"] = np.concatenate([head, p[-keep:]]), stats["prompt_truncated"] + 1
        if long_t:
            t, stats["target_truncated"] = t[:cfg.max_target_len], stats["target_truncated"] + 1
        keep_p.append(p)
        keep_q.append(q)
        keep_idx.append(i)
        if keep_t is not None:
            keep_t.append(t)
    stats["kept"] = len(keep_p)
    return TokenizedDataset(keep_p, keep_q, keep_t, np.asarray(keep_idx, np.int32), pad_id, cfg,
                            stats)


def bucket_for(length: int, sizes: tuple[int, ...]) -> int:
    """Smallest bucket that holds ``length`` tokens."""
    for size in sizes:
        if length <= size:
            return size
    raise ValueError(f"length {length} exceeds the largest bucket {sizes[-1]}")


def _pad_rows(rows: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row ids padded to ``batch_size`` by repeating the first row; and the validity mask."""
    valid = np.zeros(batch_size, bool)
    valid[:len(rows)] = True
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[0], rows.dtype)])
    return padded, valid


def collate_prompts(ds: TokenizedDataset, rows: np.ndarray, batch_size: int,
                    length: int | None = None) -> dict[str, np.ndarray]:
    """Left-padded prompt batch (prompt + response prefix) for rows of ``ds``."""
    rows, valid = _pad_rows(np.asarray(rows), batch_size)
    seqs = [np.concatenate([ds.prompt[r], ds.prefix[r]]) for r in rows]
    size = length or bucket_for(max(len(s) for s in seqs), ds.config.prompt_sizes)
    tokens = np.full((batch_size, size), ds.pad_id, np.int32)
    mask = np.zeros((batch_size, size), bool)
    for b, s in enumerate(seqs):
        tokens[b, size - len(s):] = s
        mask[b, size - len(s):] = True
    return {"prompt_tokens": tokens, "prompt_mask": mask,
            "example_idx": np.where(valid, ds.example_idx[rows], -1).astype(np.int32),
            "valid": valid}


def collate_sft(ds: TokenizedDataset, rows: np.ndarray, batch_size: int,
                length: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded prompt + target + EOS batch with the loss mask on target tokens."""
    if ds.target is None:
        raise ValueError("dataset was tokenized without targets")
    rows, valid = _pad_rows(np.asarray(rows), batch_size)
    size = length or bucket_for(int(max(len(ds.prompt[r]) + len(ds.target[r]) for r in rows)),
                                ds.config.seq_sizes)
    tokens = np.full((batch_size, size), ds.pad_id, np.int32)
    attn = np.zeros((batch_size, size), bool)
    loss = np.zeros((batch_size, size), bool)
    for b, r in enumerate(rows):
        n_p, n_t = len(ds.prompt[r]), len(ds.target[r])
        tokens[b, :n_p] = ds.prompt[r]
        tokens[b, n_p:n_p + n_t] = ds.target[r]
        attn[b, :n_p + n_t] = True
        loss[b, n_p:n_p + n_t] = valid[b]
    return {"tokens": tokens, "attn_mask": attn, "loss_mask": loss,
            "example_idx": np.where(valid, ds.example_idx[rows], -1).astype(np.int32),
            "valid": valid}
