"""reftjax: reinforced fine-tuning (ReFT) of language models in pure JAX."""

__version__ = "0.1.0"
