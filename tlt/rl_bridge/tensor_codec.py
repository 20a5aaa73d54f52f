"""Named tensors on the wire: safetensors bytes, never pickle.

`/update_weights_from_tensor` takes weights from remote callers in one of two forms:

- raw body: `Content-Type: application/octet-stream`, the body is one safetensors file
  (`safetensors.torch.save({hf_name: tensor, ...})`); options go in the query string
  (`?weight_version=v2&abort_all_requests=true`);
- JSON (SGLang's field names): `{"serialized_named_tensors": [B64, ...], "weight_version": ..., ...}` where
  each `B64` is the base64 of one safetensors file. All entries are merged into one update (a name may
  appear only once). SGLang itself puts pickled `MultiprocessingSerializer` handles there; tlt refuses
  those, because unpickling network input runs arbitrary code.

Tensor names are the HF checkpoint names (`model.layers.0.self_attn.q_proj.weight`, ...).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping

import torch


class TensorCodecError(ValueError):
    """Bytes that are not a valid safetensors buffer of named tensors."""


def _as_items(named_tensors) -> list[tuple[str, torch.Tensor]]:
    items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError("named_tensors must be a mapping or an iterable of (name, tensor) pairs")
        if not isinstance(item[1], torch.Tensor):
            raise TypeError(f"{item[0]!r} is a {type(item[1]).__name__}, not a torch.Tensor")
    return items


NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def encode_named_tensors(named_tensors: NamedTensors) -> bytes:
    """One safetensors buffer holding every tensor (moved to CPU, made contiguous)."""
    from safetensors.torch import save

    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, t in _as_items(named_tensors):
        if name in out:
            raise ValueError(f"tensor name {name!r} appears twice")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:  # safetensors refuses tensors that share memory (e.g. tied weights)
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        out[name] = t
    return save(out)


def decode_named_tensors(data: bytes) -> list[tuple[str, torch.Tensor]]:
    """Parse one safetensors buffer into (name, tensor) pairs; raise TensorCodecError if malformed."""
    from safetensors.torch import load

    if not data:
        raise TensorCodecError("empty tensor payload")
    try:
        tensors = load(bytes(data))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise TensorCodecError(f"not a safetensors buffer ({type(e).__name__}: {e}); tlt accepts "
                               "safetensors bytes only, never pickle") from None
    return list(tensors.items())


def encode_b64(named_tensors) -> str:
    return base64.b64encode(encode_named_tensors(named_tensors)).decode("ascii")


def decode_b64(text: str) -> list[tuple[str, torch.Tensor]]:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise TensorCodecError(f"serialized_named_tensors entry is not valid base64: {e}") from None
    return decode_named_tensors(data)
