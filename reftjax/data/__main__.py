"""``python -m reftjax.data stats ...``: one JSON line of dataset statistics.

Examples::

    python -m reftjax.data stats --dataset gsm8k --split train
    python -m reftjax.data stats --file data.jsonl --format openai --style chat
    python -m reftjax.data stats --dataset gsm8k --style chat --system-prompt "Be brief." \\
        --chat-template-kwargs '{"enable_thinking": false}'

Prints example count, prompt/target token-length percentiles for the tokenizer,
and how many examples exceed ``--max-prompt-len`` / ``--max-target-len``. Targets are
those of the examples with a reference CoT (``examples_with_cot``); a file where only
some have one also gets a note on stderr naming the first without, as an SFT warm-up
refuses such a file. Bad input exits with status 2 and ``path:LINE: problem`` on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from reftjax.config import DuplicateName, unique_names
from reftjax.data.prompts import STYLES, PromptConfig
from reftjax.data.records import FORMATS, DataError
from reftjax.data.sources import DATASETS, load_examples
from reftjax.data.tokenize import TokenizeConfig, tokenize_examples

PERCENTILES = (50, 90, 95, 99, 100)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reftjax.data")
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="token-length statistics as one JSON line")
    src = stats.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=DATASETS)
    src.add_argument("--file", help="read this file instead (needs --format)")
    stats.add_argument("--format", choices=FORMATS)
    stats.add_argument("--split", choices=("train", "test"), default=None,
                       help="GSM8K split (default train); the ReFT datasets are one file each (their name says it)")
    stats.add_argument("--tokenizer", default="default",
                       help="model source for reftjax.hf.load_tokenizer (default: SmolLM2)")
    stats.add_argument("--style", choices=STYLES, default=None,
                       help="prompt style (default: reft-python for svamp-python, chat for "
                            "openai files, else reft)")
    stats.add_argument("--bos", choices=("auto", "true", "false"), default="auto",
                       help="plain styles: prompts start with the tokenizer's BOS (data.prompt.bos: auto = when its "
                            "encoding adds one; the paper preset's false)")
    stats.add_argument("--system-prompt", default=None,
                       help="chat styles: the system turn a run gives (data.prompt.system_prompt)")
    stats.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                       help="chat styles: the template's variables a run passes, a JSON object such as "
                            "'{\"enable_thinking\": false}' (data.prompt.chat_template_kwargs)")
    stats.add_argument("--keep-annotations", action="store_true",
                       help="keep GSM8K calculator annotations in the CoT")
    stats.add_argument("--max-prompt-len", type=_positive, default=300,
                       help="prompt tokens a run keeps (data.tokenize.max_prompt_len; longer prompts are dropped)")
    stats.add_argument("--max-target-len", type=_positive, default=400,
                       help="target tokens a run keeps (data.tokenize.max_target_len)")
    stats.add_argument("--answer-field", default=None, help="openai format: numeric reference field")
    stats.add_argument("--text-answers", action="store_true",
                       help="reft format: gold answers are text (MathQA's letters), not numbers")
    stats.add_argument("--data-dir", default=None, help="tfds cache (default $REFTJAX_CACHE/tfds)")
    stats.add_argument("--local-dir", default=None,
                       help="GSM8K {train,test}.jsonl folder (default $REFTJAX_GSM8K_DIR) "
                            "or ReFT folder")
    return parser


def _percentiles(lengths: np.ndarray) -> dict[str, int]:
    return {f"p{q}": int(np.percentile(lengths, q)) for q in PERCENTILES} | {
        "mean": round(float(lengths.mean()), 1)}


def stats(args: argparse.Namespace) -> dict:
    """Compute the statistics for parsed CLI arguments."""
    from reftjax.hf import load_tokenizer

    if args.file is not None and args.format is None:
        raise DataError(f"{args.file}:0: --file needs --format ({', '.join(FORMATS)})")
    if args.split is not None and args.dataset != "gsm8k":
        raise DataError(f"{args.file or args.dataset}:0: --split applies to --dataset gsm8k only")
    if args.answer_field is not None and args.format != "openai":  # (was ignored; as data.answer_field in a run)
        raise DataError(f"{args.file or args.dataset}:0: --answer-field applies to --format openai files only")
    args.split = args.split or "train"
    examples = load_examples(args.dataset, split=args.split, file=args.file, fmt=args.format,
                             data_dir=args.data_dir, local_dir=args.local_dir,
                             answer_field=args.answer_field, numeric=not args.text_answers)
    style = args.style or ("reft-python" if args.dataset == "svamp-python"
                           else "chat" if args.format == "openai" else "reft")
    if (args.system_prompt is not None or args.chat_template_kwargs is not None) and not style.startswith("chat"):
        raise DataError(f"{args.file or args.dataset}:0: --system-prompt and --chat-template-kwargs apply to the chat "
                        f"styles only (--style chat or chat-python), not {style!r}")
    template_kwargs = {}
    if args.chat_template_kwargs is not None:  # (the run's prompts, measured: they reached runs only; session 39)
        example = '\'{"enable_thinking": false}\''
        try:
            template_kwargs = json.loads(args.chat_template_kwargs, object_pairs_hook=unique_names)
        except DuplicateName as e:
            raise DataError(f"--chat-template-kwargs: {e}") from None
        except ValueError as e:
            raise DataError(f"--chat-template-kwargs: not JSON ({e}); write an object such as {example}") from None
        if not isinstance(template_kwargs, dict):
            raise DataError(f"--chat-template-kwargs: expected a JSON object such as {example}, "
                            f"got {args.chat_template_kwargs!r}")
    try:
        prompt_cfg = PromptConfig(style, strip_annotations=not args.keep_annotations, system_prompt=args.system_prompt,
                                  chat_template_kwargs=template_kwargs,
                                  bos={"auto": None, "true": True, "false": False}[args.bos])
    except ValueError as e:  # (named the run's setting, not the option typed; helper review)
        raise DataError(str(e).replace("data.prompt.chat_template_kwargs", "--chat-template-kwargs")) from None
    tokenizer = load_tokenizer(args.tokenizer)
    # No limits while measuring: every example is kept, then counted against the limits.
    unlimited = TokenizeConfig(max_prompt_len=1 << 20, max_target_len=1 << 20, truncation="drop")
    # Test sets and RFT files have no reference CoT: report prompt lengths only. A file where only some examples
    # carry one: the targets of those, and a note that an SFT warm-up refuses the file (it reported prompt lengths
    # alone with no word of it; session 45's list).
    has_cot = np.array([bool(e.cot.strip()) for e in examples])
    ds = tokenize_examples(examples, tokenizer, prompt_cfg, unlimited, with_targets=bool(has_cot.all()))
    prompt_len = ds.prompt_lengths
    targets = ds.target
    if targets is None and has_cot.any():
        targets = tokenize_examples([e for e, h in zip(examples, has_cot) if h], tokenizer, prompt_cfg, unlimited,
                                    with_targets=True).target
        first = examples[int(np.flatnonzero(~has_cot)[0])]
        print(f"note: {first.at}: no reference CoT; {int((~has_cot).sum())} of {len(examples)} examples have none, "
              f"so an SFT warm-up refuses this file (RL alone, sft.epochs=0, takes it); target lengths are of the "
              f"{int(has_cot.sum())} with one", file=sys.stderr)
    source = args.file or (f"gsm8k:{args.split}" if args.dataset == "gsm8k" else args.dataset)
    out = {"source": source, "style": style,
           "examples": len(examples), "prompt_tokens": _percentiles(prompt_len),
           "over_max_prompt_len": int((prompt_len > args.max_prompt_len).sum()),
           "max_prompt_len": args.max_prompt_len}
    if targets is not None:
        target_len = np.zeros(len(examples), np.int64)  # (0 where an example has no CoT: over no limit)
        target_len[has_cot] = [len(t) for t in targets]
        out |= {"examples_with_cot": int(has_cot.sum()),
                "target_tokens_incl_eos": _percentiles(target_len[has_cot]),
                "over_max_target_len": int((target_len > args.max_target_len).sum()),
                "max_target_len": args.max_target_len,
                "over_either": int(((prompt_len > args.max_prompt_len)
                                    | (target_len > args.max_target_len)).sum())}
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = stats(args)
    except (DataError, ValueError, OSError) as e:  # (a bad --tokenizer was a traceback; review, session 30)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
