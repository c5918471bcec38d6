"""Deterministic, resumable, mesh-sharded batches.

Epoch ``e`` visits the examples in ``default_rng([seed, e]).permutation(n)``
order, so a run is reproducible from ``(seed, epoch, step)`` alone, which is all
`Loader.state` holds. Resuming after `Loader.restore` yields exactly the batches
an uninterrupted run would have.

Multi-host: every host computes the same global batch (row ids and padded
length, from the token lengths of all examples), then collates and transfers
only its own contiguous slice of rows
(``process_index * B / process_count`` onwards);
``jax.make_array_from_process_local_data`` assembles the global array. On one
host the slice is the whole batch.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reftjax.data.tokenize import TokenizedDataset, bucket_for, collate_prompts, collate_sft

KINDS = ("sft", "prompt")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Batching.

    Attributes:
      batch_size: global batch size (all hosts together).
      kind: "sft" (prompt + target sequences) or "prompt" (left-padded prompts).
      seed: shuffling seed.
      shuffle: False keeps dataset order (evaluation).
      drop_last: drop the last incomplete batch; else pad it (``valid`` False).
      num_epochs: stop after this many epochs; None = never stop.
      group_by_length: 0 = plain shuffle; k > 0 = after shuffling, sort each window
        of k batches by length and shuffle the batches' order, which cuts padding
        (GSM8K SFT, batch 8: 56% padded tokens plain, see BUILD_NOTES) while
        staying a deterministic function of (seed, epoch).
    """

    batch_size: int
    kind: str = "sft"
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    num_epochs: int | None = None
    group_by_length: int = 0

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError("num_epochs must be positive or None")
        if self.group_by_length < 0:
            raise ValueError("group_by_length must be >= 0")


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """Batch dimension over whichever of ('data', 'fsdp') the mesh has."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return PartitionSpec(axes if axes else None)


class Loader:
    """Iterator over batches of a `TokenizedDataset`; see the module docstring.

    Args:
      ds: tokenized examples.
      cfg: batching settings.
      mesh: if given, batches are global ``jax.Array`` sharded by ``spec``; else NumPy.
      spec: PartitionSpec of the batch dimension (default `batch_spec(mesh)`).
    """

    def __init__(self, ds: TokenizedDataset, cfg: LoaderConfig, mesh: Mesh | None = None,
                 spec: PartitionSpec | None = None):
        if len(ds) == 0:
            raise ValueError("empty dataset")
        if cfg.drop_last and len(ds) < cfg.batch_size:
            raise ValueError(f"{len(ds)} examples cannot fill one batch of {cfg.batch_size}")
        n_proc = jax.process_count()
        if cfg.batch_size % n_proc:
            raise ValueError(f"batch_size {cfg.batch_size} not divisible by {n_proc} processes")
        self.ds, self.cfg, self.mesh = ds, cfg, mesh
        self.spec = spec if spec is not None or mesh is None else batch_spec(mesh)
        if mesh is not None and n_proc > 1 and not (self.spec and self.spec[0] is not None):
            # each process feeds its B / processes rows, which a batch whole on every device cannot take
            raise ValueError(f"Loader: batch spec {self.spec} does not split the batch, which {n_proc} processes "
                             "cannot feed (each loads its own rows): split the leading dimension over the mesh's "
                             "batch axes (the default spec)")
        if mesh is not None and self.spec and self.spec[0] is not None:
            axes = self.spec[0] if isinstance(self.spec[0], tuple) else (self.spec[0],)
            shards = int(np.prod([mesh.shape[a] for a in axes]))
            if cfg.batch_size % shards or shards % n_proc:
                raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {shards} devices of the "
                                 f"mesh's batch axes {axes}, and they of the {n_proc} processes")
        self._lengths = ds.seq_lengths if cfg.kind == "sft" else ds.prompt_lengths
        self._sizes = ds.config.seq_sizes if cfg.kind == "sft" else ds.config.prompt_sizes
        self._local = cfg.batch_size // n_proc
        self._offset = jax.process_index() * self._local
        self._epoch, self._step = 0, 0
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        n, b = len(self.ds), self.cfg.batch_size
        return n // b if self.cfg.drop_last else -(-n // b)

    def state(self) -> dict:
        """Position as plain ints, and the dataset's `fingerprint` (checkpoint it with the train state)."""
        return {"seed": self.cfg.seed, "epoch": self._epoch, "step": self._step,
                "num_examples": len(self.ds), "batch_size": self.cfg.batch_size, "data": self.ds.fingerprint}

    def restore(self, state: dict) -> None:
        """Continue from a `state` taken with the same data and settings."""
        mine = self.state()
        for key in ("seed", "num_examples", "batch_size"):
            if int(state[key]) != mine[key]:
                raise ValueError(f"loader state mismatch: {key} {state[key]} != {mine[key]}")
        if "data" in state and state["data"] != mine["data"]:  # (states saved before the digest have none)
            raise ValueError(f"loader state mismatch: the dataset's tokens differ from those the state was taken on "
                             f"(digest {state['data']} != {mine['data']}): the data changed, e.g. a file edited in "
                             f"place, so the saved position would not resume the same batches")
        self._epoch, self._step = int(state["epoch"]), int(state["step"])
        self._order = self._permutation(self._epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.cfg.shuffle:
            return np.arange(len(self.ds))
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = rng.permutation(len(self.ds))
        if self.cfg.group_by_length == 0:
            return order
        b = self.cfg.batch_size
        n_full = len(order) // b
        # The incomplete tail is set aside before grouping, so what drop_last drops is a random draw, not the
        # longest examples of the last window (sorting put them there); it stays last and ungrouped.
        head, tail = order[:n_full * b], order[n_full * b:]
        window = b * self.cfg.group_by_length
        for start in range(0, len(head), window):
            chunk = head[start:start + window]
            head[start:start + window] = chunk[np.argsort(self._lengths[chunk], kind="stable")]
        batches = head.reshape(n_full, b)[rng.permutation(n_full)]
        return np.concatenate([batches.reshape(-1), tail])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._step >= self.batches_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
            self._order = self._permutation(self._epoch)
        if self.cfg.num_epochs is not None and self._epoch >= self.cfg.num_epochs:
            raise StopIteration
        b = self.cfg.batch_size
        rows = self._order[self._step * b:(self._step + 1) * b]
        self._step += 1
        length = bucket_for(int(self._lengths[rows].max()), self._sizes)
        # Pad the global batch first so every host slices the same B rows.
        valid = np.arange(b) < len(rows)
        rows = np.concatenate([rows, np.full(b - len(rows), rows[0])])
        local_rows = rows[self._offset:self._offset + self._local]
        local_valid = valid[self._offset:self._offset + self._local]
        collate = collate_sft if self.cfg.kind == "sft" else collate_prompts
        batch = collate(self.ds, local_rows, self._local, length)
        batch = _apply_validity(batch, local_valid)
        return batch if self.mesh is None else self._place(batch)

    def _place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        out = {}
        for key, local in batch.items():
            spec = PartitionSpec(*self.spec, *([None] * (local.ndim - 1)))
            sharding = NamedSharding(self.mesh, spec)
            global_shape = (self.cfg.batch_size, *local.shape[1:])
            out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
        return out


def _apply_validity(batch: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, np.ndarray]:
    """Mark padding rows: invalid, example_idx -1, no loss."""
    batch = dict(batch, valid=batch["valid"] & valid)
    batch["example_idx"] = np.where(batch["valid"], batch["example_idx"], -1).astype(np.int32)
    if "loss_mask" in batch:
        batch["loss_mask"] = batch["loss_mask"] & batch["valid"][:, None]
    return batch
