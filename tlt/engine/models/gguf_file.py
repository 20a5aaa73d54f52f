"""Read a GGUF file: an HF config, HF-named float tensors, and a tokenizer.

llama.cpp's converter renames tensors and, for the `llama` architecture, permutes the rows of q/k so
that its rotary kernel sees interleaved pairs; both are undone here so that the model sees exactly the
HF checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@functools.lru_cache(maxsize=2)
def _reader(path: str):
    # Parsing the metadata (49k tokens, 49k merges) takes seconds; config and tensors share one parse.
    import gguf

    return gguf.GGUFReader(path)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_hf_config(path: str):
    """A `transformers` config built from the GGUF metadata (no tensor data is read)."""
    from transformers import AutoConfig

    r = _reader(path)
    arch = _field(r, "general.architecture")
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(arch)
    if model_type is None:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3 are)")
    p = arch + "."
    n_heads = _field(r, p + "attention.head_count")
    hidden = _field(r, p + "embedding_length")
    has_output = any(t.name == "output.weight" for t in r.tensors)
    vocab = _field(r, p + "vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_field(r, p + "feed_forward_length"),
        num_hidden_layers=_field(r, p + "block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=_field(r, p + "attention.head_count_kv", n_heads),
        head_dim=_field(r, p + "attention.key_length", hidden // n_heads),
        max_position_embeddings=_field(r, p + "context_length", 4096),
        rms_norm_eps=float(_field(r, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(r, p + "rope.freq_base", 10000.0)),
        tie_word_embeddings=not has_output,
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(r, "tokenizer.ggml.padding_token_id"),
    )
    if model_type == "qwen2":
        kwargs["attention_bias"] = True
    return AutoConfig.for_model(model_type, **kwargs)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (pairs interleaved -> HF halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(path: str, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor), dequantizing quantized blocks on the fly."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    r = _reader(path)
    permute = hf_config.model_type == "llama"
    for t in r.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if m:
            suffix = _LAYER_NAMES.get(m.group(2))
            if suffix is None:
                raise ValueError(f"unknown GGUF tensor {t.name!r}")
            name = f"model.layers.{m.group(1)}.{suffix}"
        elif t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        elif t.name == "rope_freqs.weight":
            continue  # llama3 scaling factors; recomputed from the config
        else:
            raise ValueError(f"unknown GGUF tensor {t.name!r}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            arr = np.asarray(t.data)
            if t.tensor_type == GGMLQuantizationType.BF16:
                arr = torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
            arr = arr.astype(np.float32).reshape(shape)
        else:
            arr = dequantize(t.data, t.tensor_type).reshape(shape)
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hf_config.num_attention_heads if "q_proj" in name else hf_config.num_key_value_heads
            arr = _unpermute(arr, heads)
        yield name, torch.from_numpy(np.ascontiguousarray(arr))


def gguf_tokenizer(path: str, cache_dir: str | None = None):
    """The HF tokenizer embedded in a GGUF file; the (slow) conversion is cached on local disk."""
    from transformers import AutoTokenizer

    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    base = Path(cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "tlt", "tokenizers"))
    cached = base / key
    if (cached / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:  # a damaged cache is rebuilt below
            pass
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    try:
        tmp = base / (key + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached) if not cached.exists() else None
    except OSError:
        pass  # read-only home: convert every time
    return tok
