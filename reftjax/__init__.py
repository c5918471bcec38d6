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

# `python -m reftjax.<tool>` (data, models, graders, serve) runs no torch code: transformers is told torch is not
# installed, as for `python -m experiments.<name>` (`host.keep_torch_out`); an import of reftjax changes nothing
from reftjax.host import keep_torch_out, started_as_module  # noqa: E402

if started_as_module(__name__):
    keep_torch_out()
