"""Read a GGUF checkpoint without PyTorch: config, dequantised weights, tokenizer.

transformers' own GGUF loader needs torch (its reader imports it), which must
stay a test-only dependency here. This module uses the `gguf` package (NumPy
dequantisation) for tensors and metadata, and transformers' torch-free GGUF
tokenizer builder for the tokenizer. Tensor names are mapped to Hugging Face
names and Q/K rows are un-permuted exactly as transformers'
`LlamaTensorProcessor` does (llama.cpp interleaves RoPE halves on export).
"""
from __future__ import annotations

import pathlib

import numpy as np

_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SUPPORTED = ("llama", "qwen2", "qwen3")


def _metadata(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            out[key] = list(field.contents())
            continue
        try:
            out[key] = field.contents()
        except Exception:  # exotic field types we do not need
            continue
    return out


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_LAYER_MAP[parts[2]]}.{parts[3]}"
    return f"{_TOP_MAP[parts[0]]}.{parts[1]}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's RoPE row permutation (transformers' `_reverse_permute_weights`)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_config(meta: dict, tensor_names: set, path: pathlib.Path):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    arch = meta.get("general.architecture")
    if arch not in _SUPPORTED:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {_SUPPORTED}")
    g = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    if g("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path}: GGUF rope scaling {g('rope.scaling.type')!r} is not supported; "
                         "convert the model to a Hugging Face directory instead")
    heads, hidden = int(g("attention.head_count")), int(g("embedding_length"))
    # Mistral-Nemo/Small style files state a head_dim other than hidden / heads (as transformers reads them)
    head_dim = int(g("attention.key_length", g("rope.dimension_count", hidden // heads)))
    for key in ("attention.value_length", "rope.dimension_count"):
        if g(key) is not None and int(g(key)) != head_dim:
            raise ValueError(f"{path}: GGUF {arch}.{key} = {g(key)} differs from the head size {head_dim} "
                             "(partial rotary or asymmetric heads are not supported)")
    kw = dict(
        vocab_size=int(g("vocab_size") if g("vocab_size") is not None else len(meta["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        head_dim=head_dim,
        intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(g("attention.head_count_kv", g("attention.head_count"))),
        max_position_embeddings=int(g("context_length", 4096)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=_eos_ids(meta),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    # A llama-arch file is a LlamaConfig whatever its name: a MistralConfig (chosen by name) invented a 4096-token
    # sliding window that GGUF does not state and Mistral v0.2+ do not have (transformers reads them as llama too)
    # `architectures` as the hub's config.json has it: serving stacks (vLLM) pick the model class from it and refuse
    # a config without one, which every export of the default model was (review, session 29)
    from reftjax.models.config import CAUSAL_LM_CLASSES

    model_type = arch if arch in ("qwen2", "qwen3") else "llama"
    config_class = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}.get(arch, LlamaConfig)
    return config_class(**kw, architectures=[CAUSAL_LM_CLASSES[model_type]])


def _eos_ids(meta: dict):
    """The ids that end a generation: `eos_token_id`, and the end-of-turn / end-of-message ids where the file
    names other ones (Llama-3 GGUFs: eos 128001 `<|end_of_text|>`, eot 128009 `<|eot_id|>`, which ends every chat
    reply). An int when there is one, a list otherwise (as Llama-3's own config.json has it)."""
    ids = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    ids = list(dict.fromkeys(int(i) for i in ids if i is not None))
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _tokenizer(meta: dict, arch: str):
    from transformers import PreTrainedTokenizerFast
    try:  # recent transformers: a torch-free module of its lazily imported `integrations.gguf` package
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                           convert_gguf_tokenizer)
    except ImportError:  # transformers 4.x to 5.17 at least: `integrations.ggml` (torch-free); their
        # `integrations.gguf` lacks these names and imports torch eagerly (5.17 without torch: "No module named
        # 'torch'")
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    grouped = {group: {new: meta[f"tokenizer.{old}"] for old, new in renames.items() if f"tokenizer.{old}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_cfg = grouped["tokenizer"], grouped["tokenizer_config"]
    backend, extra = convert_gguf_tokenizer(arch, tok_dict)
    tokens = tok_dict["tokens"]
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id")):
        if tok_dict.get(key) is not None:
            special[name] = tokens[int(tok_dict[key])]
    backend.post_processor = _bos_eos_template(meta, tok_dict, tokens)
    # the ids the file names win: the older converters return special tokens too, llama's with bos and eos swapped;
    # no space clean-up in decode (4.56's converter asked for it: "30 / .5" decoded as "30 /.5")
    extra = {k: v for k, v in extra.items() if k not in ("add_bos_token", "add_eos_token")}
    kwargs = {**extra, **special, "clean_up_tokenization_spaces": False}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if tok_cfg.get("chat_template"):
        tok.chat_template = tok_cfg["chat_template"]
    return tok


def _bos_eos_template(meta: dict, tok_dict: dict, tokens: list):
    """The post-processor that adds BOS / EOS as the file says, as llama.cpp and recent transformers read it (a
    sentencepiece vocabulary without the flag adds BOS). Set here, whatever transformers' converter did: 4.56's
    added BOS although SmolLM2's file says add_bos_token false, putting <|im_start|> before every prompt."""
    from tokenizers import processors

    marks = {}  # placeholder names in the template (a token's own text may hold ':' or spaces, which it cannot)
    for name, default in (("BOS", meta.get("tokenizer.ggml.model") == "llama"), ("EOS", False)):
        token_id = tok_dict.get(f"{name.lower()}_token_id")
        if token_id is not None and meta.get(f"tokenizer.ggml.add_{name.lower()}_token", default):
            marks[name] = {"id": name, "ids": [int(token_id)], "tokens": [tokens[int(token_id)]]}

    def template(seq: str, type_id: int) -> str:
        return " ".join(f"{p}:{type_id}" for p in ["BOS"] * ("BOS" in marks) + [f"${seq}"] + ["EOS"] * ("EOS" in marks))

    return processors.TemplateProcessing(single=template("A", 0), pair=f"{template('A', 0)} {template('B', 1)}",
                                         special_tokens=list(marks.values()))


def read_gguf(path: str | pathlib.Path, with_tokenizer: bool = True):
    """Return (hf_config, {hf_name: float32 array in HF [out, in] layout}, tokenizer or None)."""
    import gguf

    path = pathlib.Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    meta = _metadata(reader)
    shards = int(meta.get("split.count") or 1)
    if shards > 1:  # each shard holds some tensors: read alone, it guessed tie_word_embeddings and missed layers
        raise ValueError(f"{path}: one shard of a split GGUF ({shards} shards): merge them first "
                         "(`llama-gguf-split --merge FIRST_SHARD OUT.gguf`) and pass the merged file")
    names = {t.name for t in reader.tensors}
    config = _hf_config(meta, names, path)
    tensors = {}
    # llama.cpp permutes the Q/K rows (weights and biases) for its interleaved RoPE in the llama family only;
    # qwen2/qwen3 tensors are stored in Hugging Face order (llama.cpp's converter permutes for LlamaModel only)
    permuted = meta.get("general.architecture") == "llama"
    for t in reader.tensors:
        w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        if t.name == "rope_freqs.weight":  # llama.cpp's form of Llama-3.1-style RoPE scaling: per-frequency factors
            if not np.all(w == 1.0):
                raise ValueError(f"{path}: GGUF rope_freqs.weight holds RoPE scaling factors (Llama 3.1-style); "
                                 "reading them from GGUF is not supported: use the Hugging Face directory instead")
            continue
        if permuted and ".attn_q." in t.name:
            w = _unpermute(w, config.num_attention_heads)
        elif permuted and ".attn_k." in t.name:
            w = _unpermute(w, config.num_key_value_heads)
        try:
            tensors[_hf_name(t.name)] = w
        except (KeyError, IndexError) as e:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for architecture "
                             f"{meta.get('general.architecture')!r}") from e
    tokenizer = _tokenizer(meta, meta["general.architecture"]) if with_tokenizer else None
    return config, tensors, tokenizer
