"""Data for reftjax: GSM8K via tfds, ReFT/OpenAI files, prompts, tokenization, loading.

Typical use::

    examples = load_examples("gsm8k", split="train")
    train, val = train_val_split(examples, SplitConfig(val_fraction=0.05, seed=0))
    ds = tokenize_examples(train, tokenizer, PromptConfig("reft"), TokenizeConfig())
    for batch in Loader(ds, LoaderConfig(batch_size=32, seed=0), mesh=mesh): ...
"""
from reftjax.data.loader import Loader, LoaderConfig, batch_spec
from reftjax.data.prompts import ANSWER_TRIGGER, Formatted, PromptConfig, format_example
from reftjax.data.records import DataError, Example, read_file, strip_annotations
from reftjax.data.sources import DATASETS, SplitConfig, load_examples, load_gsm8k, train_val_split
from reftjax.data.tokenize import (TokenizeConfig, TokenizedDataset, collate_prompts, collate_sft,
                                   tokenize_examples)

__all__ = [
    "ANSWER_TRIGGER", "DATASETS", "DataError", "Example", "Formatted", "Loader", "LoaderConfig",
    "PromptConfig", "SplitConfig", "TokenizeConfig", "TokenizedDataset", "batch_spec",
    "collate_prompts", "collate_sft", "format_example", "load_examples", "load_gsm8k", "read_file",
    "strip_annotations", "tokenize_examples", "train_val_split",
]
