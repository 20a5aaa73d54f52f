"""A Python client for tlt's gRPC API (`tlt serve --grpc-port N`), the twin of client.HttpClient.

    client = GrpcClient("127.0.0.1:50051", api_key=KEY)
    outs = client.generate(input_ids=batch, sampling_params={"max_new_tokens": 512}, return_logprob=True)
    client.update_weights_from_tensor(policy.state_dict(), weight_version="step-7")

It returns the same dicts as `HttpClient` (SGLang's `text`, `output_ids`, `meta_info`). Weights travel as
one safetensors buffer cut into chunks, never pickle.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grpc

from tlt.rl_bridge.grpc_messages import output_dict, sampling_params_pb
from tlt.rl_bridge.proto import tlt_pb2 as pb
from tlt.rl_bridge.proto import tlt_pb2_grpc as pb_grpc

_GENERATE_OPTIONS = ("rid", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")


class TltGrpcError(RuntimeError):
    """The server refused or failed a call: the gRPC `code` and the server's `message`."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class GrpcClient:
    """Synchronous client of `service Tlt`. Thread-safe as a gRPC channel is; use one per process."""

    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None,
                 timeout: float | None = 600.0, chunk_bytes: int = 1 << 20):
        self.target = target
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.TltStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request, **kw):
        try:
            return method(request, timeout=kw.pop("timeout", self.timeout), metadata=self._metadata, **kw)
        except grpc.RpcError as e:
            raise TltGrpcError(e.code(), e.details()) from None

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 **kwargs) -> dict | list[dict]:
        """One output dict for one prompt (n=1), else a list (n per prompt, in order).

        A batch goes as concurrent calls, which the engine batches; other keyword arguments are rid (a
        string is a prefix for a batch, as in SGLang), logprob_start_len, top_logprobs_num,
        return_text_in_logprobs.
        """
        requests, single = _requests(prompt, input_ids, sampling_params, return_logprob, kwargs)
        futures = [self._stub.Generate.future(r, timeout=self.timeout, metadata=self._metadata) for r in requests]
        outs = []
        try:
            for f in futures:
                outs.extend(output_dict(o) for o in f.result().outputs)
        except grpc.RpcError as e:
            for f in futures:
                f.cancel()
            raise TltGrpcError(e.code(), e.details()) from None
        return outs[0] if single and len(outs) == 1 else outs

    def stream_generate(self, prompt: str | None = None, sampling_params: dict | None = None,
                        input_ids: list[int] | None = None, return_logprob: bool = False,
                        **kwargs) -> Iterator[dict]:
        """Yields output dicts holding everything generated so far; closing the iterator aborts."""
        (request,), _ = _requests(prompt, input_ids, sampling_params, return_logprob, kwargs)
        call = self._stub.GenerateStream(request, timeout=self.timeout, metadata=self._metadata)
        try:
            for resp in call:
                yield output_dict(resp.outputs[0])
        except grpc.RpcError as e:
            raise TltGrpcError(e.code(), e.details()) from None
        finally:
            call.cancel()  # no-op once the stream has ended

    # ------------------------------------------------------------------ weights
    def update_weights_from_tensor(self, named_tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
                                   weight_version: str | None = None,
                                   abort_all_requests: bool = False) -> dict:
        """Send weights (HF names -> tensors, all or some) as streamed chunks. Atomic: on any bad name,
        shape or dtype nothing changes and TltGrpcError(INVALID_ARGUMENT) is raised."""
        from tlt.rl_bridge.tensor_codec import encode_named_tensors

        data = encode_named_tensors(named_tensors)
        resp = self._call(self._stub.UpdateWeights,
                          _chunks(data, self.chunk_bytes, weight_version, abort_all_requests))
        return {"success": resp.success, "message": resp.message, "weight_version": resp.weight_version}

    # ------------------------------------------------------------------ control, status
    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> dict:
        resp = self._call(self._stub.Abort, pb.AbortRequest(rid=rid or "", abort_all=abort_all))
        return {"success": resp.success, "message": resp.message}

    def get_model_info(self) -> dict:
        resp = self._call(self._stub.ModelInfo, pb.ModelInfoRequest())
        info = {f.name: getattr(resp, f.name) for f in resp.DESCRIPTOR.fields}
        info["drafter_version"] = resp.drafter_version if resp.HasField("drafter_version") else None
        return info

    model_info = get_model_info

    def get_stats(self) -> dict:
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(self._call(self._stub.GetStats, pb.GetStatsRequest()).stats)

    def health(self, generate: bool = False) -> bool:
        """Whether the server answers (with `generate`: and can generate one token)."""
        try:
            self._call(self._stub.Health, pb.HealthRequest(generate=generate), timeout=30 if generate else 5)
            return True
        except TltGrpcError:
            return False

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.25) -> None:
        """Block until Health answers; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.health():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} not healthy after {timeout:.0f}s")
            time.sleep(interval)


def _requests(prompt, input_ids, sampling_params, return_logprob, extra) -> tuple[list[pb.GenerateRequest], bool]:
    """One GenerateRequest per prompt, and whether a single prompt was given."""
    unknown = sorted(set(extra) - set(_GENERATE_OPTIONS))
    if unknown:
        raise TypeError(f"generate() got unknown argument(s) {unknown}")
    if (prompt is None) == (input_ids is None):
        raise ValueError("give exactly one of prompt (text) or input_ids")
    if prompt is not None:
        single = isinstance(prompt, str)
        prompts = [{"text": p} for p in ([prompt] if single else prompt)]
    else:
        single = not input_ids or not isinstance(input_ids[0], (list, tuple))
        prompts = [{"input_ids": pb.TokenIds(ids=ids)} for ids in ([input_ids] if single else input_ids)]
    params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
    rid = extra.get("rid")
    if isinstance(rid, list):
        rids = rid
    elif rid is None or single:
        rids = [rid] * len(prompts)
    else:  # as SGLang: a single rid is a prefix for the items of a batch
        rids = [f"{rid}_{i}" for i in range(len(prompts))]
    if len(params) != len(prompts) or len(rids) != len(prompts):
        raise ValueError("sampling_params and rid lists must have one entry per prompt")
    requests = []
    for p, sp, r in zip(prompts, params, rids):
        req = pb.GenerateRequest(**p, sampling_params=sampling_params_pb(sp), rid=r or "",
                                 return_logprob=return_logprob,
                                 top_logprobs_num=extra.get("top_logprobs_num") or 0,
                                 return_text_in_logprobs=bool(extra.get("return_text_in_logprobs")))
        if extra.get("logprob_start_len") is not None:
            req.logprob_start_len = extra["logprob_start_len"]
        requests.append(req)
    return requests, single


def _chunks(data: bytes, size: int, weight_version: str | None, abort_all: bool) -> Iterator[pb.WeightsChunk]:
    first = pb.WeightsChunk(data=data[:size], abort_all_requests=abort_all, total_bytes=len(data))
    if weight_version is not None:
        first.weight_version = str(weight_version)
    yield first
    for start in range(size, len(data), size):
        yield pb.WeightsChunk(data=data[start:start + size])
