"""The engine's dicts <-> the gRPC messages of proto/tlt.proto, both ways, in one place.

The server turns requests into `Engine.async_generate` arguments and outputs into messages; the client
does the reverse, so that `GrpcClient` returns exactly the dicts `HttpClient` does (SGLang's `text`,
`output_ids`, `meta_info`, logprobs as (logprob, token id, text) triples).
"""

from __future__ import annotations

from typing import Any

from tlt.rl_bridge.proto import tlt_pb2 as pb

_META_SCALARS = ("id", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency", "weight_version")
_META_OPTIONAL = ("drafter_version", "spec_verify_ct", "spec_accept_token_num")
_LOGPROB_LISTS = ("output_token_logprobs", "input_token_logprobs")
_TOP_LISTS = ("output_top_logprobs", "input_top_logprobs")


# ---------------------------------------------------------------------------------------------- sampling
def sampling_params_pb(params: dict[str, Any] | None) -> pb.SamplingParams:
    """A sampling-params dict (SGLang names) as a message; None values mean "default" and are left unset."""
    msg = pb.SamplingParams()
    for key, value in (params or {}).items():
        if value is None:
            continue
        if key not in pb.SamplingParams.DESCRIPTOR.fields_by_name:
            raise ValueError(f"unknown sampling parameter {key!r}")
        if key == "stop" and isinstance(value, str):
            value = [value]
        if key == "stop_token_ids" and isinstance(value, int):
            value = [value]
        if isinstance(value, (list, tuple)):
            getattr(msg, key).extend(value)
        else:
            setattr(msg, key, value)
    return msg


def sampling_params_dict(msg: pb.SamplingParams) -> dict[str, Any]:
    """The fields a caller set (the engine's `SamplingParams` validates them and fills the defaults)."""
    return {field.name: list(value) if field.is_repeated else value for field, value in msg.ListFields()}


# ---------------------------------------------------------------------------------------------- outputs
def output_pb(out: dict[str, Any]) -> pb.Output:
    """One engine output dict as a message."""
    meta = out["meta_info"]
    m = pb.MetaInfo(**{k: meta[k] for k in _META_SCALARS})
    for key in _META_OPTIONAL:
        if meta.get(key) is not None:
            setattr(m, key, meta[key])
    m.spec_accept_histogram.extend(meta.get("spec_accept_histogram", ()))
    reason = meta.get("finish_reason")
    if reason is not None:
        m.finish_reason.type = reason["type"]
        for key in ("length", "message"):
            if reason.get(key) is not None:
                setattr(m.finish_reason, key, reason[key])
        matched = reason.get("matched")
        if isinstance(matched, int):
            m.finish_reason.matched_token = matched
        elif isinstance(matched, str):
            m.finish_reason.matched_text = matched
    for key in _LOGPROB_LISTS:
        if key in meta:
            getattr(m, key).SetInParent()  # present even when empty
            getattr(m, key).items.extend(_token_logprob_pb(t) for t in meta[key])
    for key in _TOP_LISTS:
        if key in meta:
            getattr(m, key).SetInParent()
            getattr(m, key).items.extend(pb.TopLogprobs(entries=[_token_logprob_pb(t) for t in tops or ()])
                                         for tops in meta[key])
    return pb.Output(text=out["text"], output_ids=out["output_ids"], meta_info=m)


def output_dict(msg: pb.Output) -> dict[str, Any]:
    """One output message as the dict SGLang's HTTP API returns."""
    m = msg.meta_info
    meta: dict[str, Any] = {k: getattr(m, k) for k in _META_SCALARS}
    meta["finish_reason"] = None
    if m.HasField("finish_reason"):
        r = m.finish_reason
        reason: dict[str, Any] = {"type": r.type}
        for key in ("length", "message"):
            if r.HasField(key):
                reason[key] = getattr(r, key)
        which = r.WhichOneof("matched")
        if which is not None:
            reason["matched"] = getattr(r, which)
        meta["finish_reason"] = reason
    for key in _META_OPTIONAL:
        if m.HasField(key):
            meta[key] = getattr(m, key)
    if m.HasField("spec_verify_ct"):  # set together with the histogram, which may be empty
        meta["spec_accept_histogram"] = list(m.spec_accept_histogram)
    for key in _LOGPROB_LISTS:
        if m.HasField(key):
            meta[key] = [_token_logprob_list(t) for t in getattr(m, key).items]
    for key in _TOP_LISTS:
        if m.HasField(key):
            meta[key] = [[_token_logprob_list(t) for t in tops.entries] if tops.entries else None
                         for tops in getattr(m, key).items]
    return {"text": msg.text, "output_ids": list(msg.output_ids), "meta_info": meta}


def _token_logprob_pb(triple) -> pb.TokenLogprob:
    logprob, token_id, text = triple
    t = pb.TokenLogprob(token_id=token_id)
    if logprob is not None:
        t.logprob = logprob
    if text is not None:
        t.text = text
    return t


def _token_logprob_list(t: pb.TokenLogprob) -> list:
    return [t.logprob if t.HasField("logprob") else None, t.token_id, t.text if t.HasField("text") else None]
