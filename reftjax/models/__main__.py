"""``python -m reftjax.models score ...``: per-token log-probs and perplexity of a text.

Example::

    python -m reftjax.models score --model default --text-file story.txt

Prints one JSON line::

    {"tokens": [...], "logprobs": [null, ...], "perplexity": 12.3, "num_tokens": 57}

``logprobs[i]`` is log p(token i | tokens < i) (the first token has no context,
hence null); ``perplexity`` is exp of the mean negative log-prob over tokens
1..n-1. Bad input exits with status 2 and a one-line message on stderr.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from reftjax.models.config import ModelConfig
from reftjax.models.llama import forward


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reftjax.models")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="per-token log-probs and perplexity of a text, as one JSON line")
    score.add_argument("--model", default="default",
                       help="model source: HF directory, .gguf file, hub id, or 'default' (SmolLM2)")
    score.add_argument("--text-file", required=True, help="UTF-8 text to score")
    score.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="compute (and storage) dtype")
    return parser


@functools.partial(jax.jit, static_argnums=1)
def token_logprobs(params, cfg: ModelConfig, tokens_1xT: jax.Array) -> jax.Array:
    """log p(token t | tokens < t) for t = 1..T-1, float32 [T-1] (batch of one, no padding)."""
    logits, _ = forward(params, cfg, tokens_1xT, jnp.ones_like(tokens_1xT))
    logp_TxV = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_TxV, tokens_1xT[0, 1:, None], axis=-1)[:, 0]


def _read_text(path: str) -> str:
    p = pathlib.Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{p}: text file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{p}: is a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def score(args: argparse.Namespace) -> dict:
    """Score the text of parsed CLI arguments; raises ValueError (incl. CheckpointError) on bad input."""
    from reftjax.hf import load_model

    text = _read_text(args.text_file)
    model = load_model(args.model, dtype=args.dtype, param_dtype=args.dtype)
    ids = model.tokenizer(text)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"{args.text_file}: text has {len(ids)} token(s); scoring needs at least 2")
    tokens = jnp.asarray(np.asarray(ids, np.int32)[None, :])
    logprobs = np.asarray(token_logprobs(model.params, model.config, tokens), np.float64)
    return {"tokens": model.tokenizer.convert_ids_to_tokens(ids),
            "logprobs": [None] + [float(x) for x in logprobs],
            "perplexity": math.exp(-float(logprobs.mean())),
            "num_tokens": len(ids)}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = score(args)
    except ValueError as e:  # CheckpointError is a ValueError
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
