"""Where examples come from: GSM8K through tfds, local files, and splits.

Locations (each can be overridden by an argument):

* ``REFTJAX_CACHE``: reftjax's cache root; tfds' ``data_dir`` is its ``tfds/`` folder (default
  ``~/.cache/reftjax/tfds``, as the XLA cache is ``xla/`` and the dense model copies sit in it); the
  GSM8K build happens once per cache dir and source: a build from a local copy lives
  in ``local-<sha256 of its two files>/``, so an edited or different copy is built
  afresh instead of being shadowed by an older build.
* ``REFTJAX_GSM8K_DIR``: a folder with GSM8K's ``train.jsonl`` and ``test.jsonl``
  to build from offline. Unset: ``../shared/data/gsm8k`` relative to the current
  directory or to the repository if present, else download from OpenAI's GitHub.
* ``REFTJAX_REFT_DIR``: the ReFT authors' JSON files (default
  ``../shared/data/reft`` found the same way).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import sys

import numpy as np

from reftjax.data.records import DataError, Example, parse_number, read_file, read_reft_json

_REPO = pathlib.Path(__file__).resolve().parents[2]

# ReFT-authors datasets shipped as JSON: name -> (file, needs a CoT).
REFT_FILES = {
    "svamp-nl": ("svamp_nl.json", True),
    "svamp-python": ("svamp_python_sdp.json", True),
    "svamp-test": ("svamp_test_set.json", False),
    "gsm8k-reft-test": ("gsm8k_test_set.json", False),
}
DATASETS = ("gsm8k", *REFT_FILES)


def cache_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """The tfds data_dir: argument, else ``$REFTJAX_CACHE/tfds``, else ``~/.cache/reftjax/tfds`` (the env root
    itself was the data_dir before, unlike the default and the XLA cache's ``$REFTJAX_CACHE/xla``)."""
    if override is not None:
        return pathlib.Path(override).expanduser()
    env = os.environ.get("REFTJAX_CACHE")
    return (pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache/reftjax") / "tfds"


def _shared_dir(env: str, sub: str, override) -> pathlib.Path | None:
    if override is not None:
        return pathlib.Path(override).expanduser()
    if os.environ.get(env):
        return pathlib.Path(os.environ[env]).expanduser()
    for base in (pathlib.Path.cwd(), _REPO):
        candidate = base.parent / "shared" / "data" / sub
        if candidate.is_dir():
            return candidate
    return None


def gsm8k_local_dir(override: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Local GSM8K copy to build from, or None (then tfds downloads)."""
    return _shared_dir("REFTJAX_GSM8K_DIR", "gsm8k", override)


def reft_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """Folder of the ReFT authors' JSON files; DataError if none is found."""
    found = _shared_dir("REFTJAX_REFT_DIR", "reft", override)
    if found is None:
        raise DataError("ReFT data folder not found (the ReFT authors' SVAMP / GSM8K JSON files): set "
                        "REFTJAX_REFT_DIR to the folder holding them (../shared/data/reft beside a checkout), or "
                        "give the data as a file (--set data.train_file=... in a run, --file for reftjax.data)")
    return found


def _local_fingerprint(local: pathlib.Path) -> str:
    """First 16 hex digits of the sha256 over the local copy's train and test files."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        path = local / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}:0: file not found (GSM8K local copy)")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _tfds_bars(enable: bool):
    """tfds's progress bars (building: "Generating splits...", "Shuffling ...") on or off for the block, then as they
    were: `--no-progress` printed them (session 35's list). tfds's switch is module-global; a user's own
    `tfds.disable_progress_bar()` stays in force."""
    from tensorflow_datasets.core.utils import tqdm_utils

    before = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(before and enable)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(before)


def load_gsm8k(split: str, *, data_dir=None, local_dir=None, progress: bool = True) -> list[Example]:
    """GSM8K ``train`` (7,473) or ``test`` (1,319) through tfds, building it if needed.

    Args:
      split: "train" or "test".
      data_dir: tfds cache (see `cache_dir`).
      local_dir: folder with ``{train,test}.jsonl`` (see `gsm8k_local_dir`).
      progress: tfds's progress bars while it downloads and builds (its one-line messages stay, on stderr).
    """
    # Imported here: tfds is only needed for GSM8K, not for the JSON formats.
    from reftjax.data.gsm8k_builder import Gsm8kReft

    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    local = gsm8k_local_dir(local_dir)
    root = cache_dir(data_dir)
    if local is not None:
        root = root / f"local-{_local_fingerprint(local)}"
    builder = Gsm8kReft(data_dir=os.fspath(root), local_dir=local,
                        file_format="array_record")
    # tfds prints "Downloading and preparing dataset ..." to stdout: on a cold cache the experiments' one JSON line and
    # `python -m reftjax.data stats`'s were not the only stdout (review, session 30)
    with contextlib.redirect_stdout(sys.stderr), _tfds_bars(progress):
        builder.download_and_prepare()
    source = builder.as_data_source(split=split)
    out = []
    for i, rec in enumerate(source.__getitems__(range(len(source)))):  # (one read: twice as fast as one per record)
        answer = rec["answer"].decode()
        out.append(Example(i, f"gsm8k_{split}_{i}", rec["question"].decode(), rec["cot"].decode(),
                           answer, parse_number(answer, f"gsm8k/{split}:{int(rec['line'])}")))
    return out


def load_examples(dataset: str | None = None, *, split: str = "train", file=None,
                  fmt: str | None = None, data_dir=None, local_dir=None,
                  answer_field: str | None = None, numeric: bool = True, progress: bool = True) -> list[Example]:
    """One entry point for the CLI and the trainers.

    Args:
      dataset: one of `DATASETS` (ignored when ``file`` is given).
      split: GSM8K split ("train"/"test").
      file: a file to read instead; ``fmt`` is then required.
      fmt: "reft", "openai" or "gsm8k-jsonl".
      data_dir: tfds cache override.
      local_dir: GSM8K local copy, or the ReFT folder for ReFT datasets.
      answer_field: for ``openai`` files, the numeric reference field to parse.
      numeric: for ``reft`` files and datasets, the gold answers are numbers (False: text, MathQA's letters).
      progress: tfds's progress bars when GSM8K is built (`load_gsm8k`).
    """
    if file is not None:
        if fmt is None:
            raise ValueError("fmt is required with file")
        kwargs = {"answer_field": answer_field} if fmt == "openai" else {"numeric": numeric} if fmt == "reft" else {}
        return read_file(file, fmt, **kwargs)
    if dataset == "gsm8k":
        return load_gsm8k(split, data_dir=data_dir, local_dir=local_dir, progress=progress)
    if dataset in REFT_FILES:
        name, needs_cot = REFT_FILES[dataset]
        return read_reft_json(reft_dir(local_dir) / name, require_cot=needs_cot, numeric=numeric)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS} or a file")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """Deterministic train/validation split.

    Attributes:
      val_fraction: share of examples for validation, in [0, 1).
      seed: permutation seed; the same seed and size always give the same split.
    """

    val_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def train_val_split(examples: list[Example], cfg: SplitConfig) -> tuple[list[Example], list[Example]]:
    """Split by a seeded permutation; each part keeps file order and is re-indexed from 0.

    The original position is kept in ``item_id`` (unchanged), while ``idx`` becomes
    the index inside the part, which is what batches carry as ``example_idx``.
    """
    n_val = int(round(len(examples) * cfg.val_fraction))
    perm = np.random.default_rng(cfg.seed).permutation(len(examples))
    val_set = set(perm[:n_val].tolist())
    train = [e for i, e in enumerate(examples) if i not in val_set]
    val = [e for i, e in enumerate(examples) if i in val_set]
    reindex = lambda part: [dataclasses.replace(e, idx=i) for i, e in enumerate(part)]  # noqa: E731
    return reindex(train), reindex(val)
