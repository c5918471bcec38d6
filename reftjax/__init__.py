"""reftjax: reinforced fine-tuning (ReFT) of language models in pure JAX."""
import logging

__version__ = "0.1.0"


class _TorchFreeFilter(logging.Filter):
    """transformers warns on import, without torch, "PyTorch was not found. Models won't be available": reftjax
    reads and writes checkpoints and runs tokenizers torch-free by design (the README's main command installs no
    torch), so every run began with a warning that reads like a broken install. Only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found.")


logging.getLogger("transformers").addFilter(_TorchFreeFilter())
