"""`tlt serve`: SGLang's native HTTP API and an OpenAI-compatible API over one `Engine`.

Point a trainer's SGLang URL (verl, slime, AReaL) or an OpenAI client at it. Endpoints:

- generation: POST /generate (SGLang's `GenerateReqInput`; `stream` sends `data: {json}` events carrying
  everything generated so far, then `data: [DONE]`), /v1/completions, /v1/chat/completions, GET /v1/models
- weights: /update_weights_from_disk, /update_weights_from_tensor (safetensors bytes, see tensor_codec),
  /init_weights_update_group + /update_weights_from_distributed + /destroy_weights_update_group
  (torch.distributed broadcast from the trainer, rank 0), /get_weights_by_name, /get_weight_version,
  /update_weight_version, /get_weights_checksum (tlt)
- control: /pause_generation, /continue_generation, /abort_request, /flush_cache,
  /release_memory_occupation + /resume_memory_occupation (tags: kv_cache, weights)
- status: /health, /health_generate, /get_model_info, /get_server_info (= /server_info), /get_load,
  /v1/loads, /metrics (Prometheus)

Semantics worth knowing: a weight update is atomic (validated whole before anything changes; on any error
the old weights stay and `weight_version` does not move) and lands between two engine steps; requests in
flight then continue on the new weights with the KV they have (send `abort_all_requests`, or pause with
`mode: abort`, to end them first). A client that disconnects aborts its request. The engine steps on the
event loop, so while it generates, each loop turn costs one engine step: pause before a large
`update_weights_from_tensor` upload, or use `update_weights_from_disk`.

Security (see security.py): binds 127.0.0.1 unless told otherwise; binding elsewhere requires
`--api-key` (then every endpoint but /health needs `Authorization: Bearer KEY`) and `--weight-roots`
(the only folders /update_weights_from_disk may read). Bodies are limited in size; every bad request gets
a 4xx with a JSON message and changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import logging
import os
import sys
import time

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from tlt.engine.engine import Engine
from tlt.rl_bridge import schemas
from tlt.rl_bridge.errors import ApiError, JSONResponse, error_response
from tlt.rl_bridge.metrics import ServerMetrics
from tlt.rl_bridge.openai_api import add_openai_routes
from tlt.rl_bridge.security import GuardMiddleware, is_loopback, resolve_weight_path
from tlt.rl_bridge.serving import (
    SSE_DONE,
    EventStream,
    ServerOptions,
    ServerState,
    as_api_error,
    generate_or_abort,
    new_rid,
    open_stream,
    sse,
    sse_error,
)
from tlt.rl_bridge.tensor_codec import TensorCodecError, decode_b64, decode_named_tensors

logger = logging.getLogger("tlt.http")

HEALTH_GENERATE_TIMEOUT_S = 20.0


def create_app(engine: Engine, api_key: str | None = None, weight_roots: list[str] | None = None,
               **options) -> FastAPI:
    """The ASGI app serving `engine`. Call it (and create the engine) on the thread that will run the
    event loop. `options` are the other fields of `ServerOptions`."""
    roots = list(weight_roots) if weight_roots else None
    opts = ServerOptions(api_key=api_key, weight_roots=roots, **options)
    app = FastAPI(title="tlt", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(set())
    state = ServerState(engine, opts, metrics)
    app.state.tlt = state

    # ------------------------------------------------------------------------------------------ generate
    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        req = schemas.parse(schemas.GenerateReqInput, await request.body())
        kwargs, rids = _generate_kwargs(req)
        t0 = time.perf_counter()
        if req.stream:
            it = await open_stream(engine, **kwargs)
            return EventStream(_native_stream(it, state, t0))
        out = await generate_or_abort(request, engine, rids, **kwargs)
        metrics.observe_latency(time.perf_counter() - t0)
        return JSONResponse(out)

    # ------------------------------------------------------------------------------------------ weights
    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        req = schemas.parse(schemas.UpdateWeightsFromDiskReq, await request.body())
        path = _weights_guard(lambda: resolve_weight_path(req.model_path, opts.weight_roots))
        if req.abort_all_requests or req.abort_all_request:
            engine.abort_request(abort_all=True)
        _, message = _weights_guard(lambda: engine.update_weights_from_disk(
            path, weight_version=req.weight_version, load_format=req.load_format))
        return _weights_ok(message)

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request):
        body = await request.body()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in ("application/octet-stream", "application/x-safetensors"):
            q = dict(request.query_params)
            unknown = sorted(set(q) - {"weight_version", "abort_all_requests", "flush_cache"})
            if unknown:
                raise ApiError(400, f"unknown query parameter(s) {unknown}")
            weight_version = q.get("weight_version")
            abort_all = _query_bool(q, "abort_all_requests")
            named = _weights_guard(lambda: decode_named_tensors(body))
        else:
            req = schemas.parse(schemas.UpdateWeightsFromTensorReq, body)
            entries = [req.serialized_named_tensors] if isinstance(req.serialized_named_tensors, str) \
                else req.serialized_named_tensors
            named = _weights_guard(lambda: _merge([decode_b64(e) for e in entries]))
            weight_version, abort_all = req.weight_version, req.abort_all_requests
        if not named:
            raise _weights_error(400, "no tensors in the update")
        if abort_all:
            engine.abort_request(abort_all=True)
        _, message = _weights_guard(
            lambda: engine.update_weights_from_tensor(named, weight_version=weight_version))
        return _weights_ok(message)

    # Weights broadcast by the trainer (rank 0) over torch.distributed, SGLang's way. Joining and receiving
    # wait for the trainer, so they run off the loop (see Engine.init_weights_update_group); a failure is
    # SGLang's `{"success": false, "message"}` with status 400.
    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request):
        req = schemas.parse(schemas.InitWeightsUpdateGroupReq, await request.body())
        try:
            _, message = await asyncio.to_thread(
                engine.init_weights_update_group, req.master_address, req.master_port, req.rank_offset,
                req.world_size, group_name=req.group_name, backend=req.backend)
        except (ValueError, TypeError, OSError, RuntimeError) as e:
            raise _weights_error(400, f"could not join the weight update group: {e}") from None
        return JSONResponse({"success": True, "message": message})

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request):
        req = schemas.parse(schemas.UpdateWeightsFromDistributedReq, await request.body())
        if req.abort_all_requests:
            engine.abort_request(abort_all=True)
        try:
            _, message = await engine.async_update_weights_from_distributed(
                req.names, req.dtypes, req.shapes, group_name=req.group_name, weight_version=req.weight_version,
                load_format=req.load_format)
        except (ValueError, TypeError, RuntimeError) as e:
            raise _weights_error(400, f"weight update rejected, weights unchanged: {e}") from None
        return _weights_ok(message)

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request):
        req = schemas.parse(schemas.DestroyWeightsUpdateGroupReq, await request.body(), allow_empty=True)
        try:
            _, message = engine.destroy_weights_update_group(req.group_name)
        except (ValueError, RuntimeError) as e:
            raise _weights_error(400, str(e)) from None
        return JSONResponse({"success": True, "message": message})

    # ------------------------------------------------------------------------------------------ memory
    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory_occupation(request: Request):
        """Free KV cache and/or weights (see Engine.release_memory_occupation); generating then gets 503."""
        req = schemas.parse(schemas.MemoryOccupationReq, await request.body(), allow_empty=True)
        try:
            engine.release_memory_occupation(req.tags)
        except ValueError as e:  # unknown tag, or requests in flight
            raise ApiError(400, str(e)) from None
        return JSONResponse({"success": True, "message": "memory released", "released": engine.released_memory})

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory_occupation(request: Request):
        req = schemas.parse(schemas.MemoryOccupationReq, await request.body(), allow_empty=True)
        try:
            engine.resume_memory_occupation(req.tags)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return JSONResponse({"success": True, "message": "memory resumed", "released": engine.released_memory})

    # ------------------------------------------------------------------------------------------ drafter
    @app.api_route("/update_drafter", methods=["POST"])
    @app.api_route("/update_drafter_from_disk", methods=["POST"])
    async def update_drafter(request: Request):
        """A new drafter version from a folder (under --weight-roots); the current one stays on any error."""
        req = schemas.parse(schemas.UpdateDrafterReq, await request.body())
        path = _weights_guard(lambda: resolve_weight_path(req.path, opts.weight_roots))
        _weights_guard(lambda: engine.update_drafter(path, version=req.version))
        return JSONResponse({"success": True, "drafter_version": engine.drafter_version})

    @app.get("/drafter/status")
    async def drafter_status():
        """What the drafter is doing: version, speculation mode (or why it is suspended), the selector's
        estimates, accept counters, drafter-data records handed out."""
        st = engine.get_stats()
        rounds = st.get("spec_verify_rounds", 0)
        keys = ("spec_verify_rounds", "spec_accepted_tokens", "spec_rounds_by_arm", "spec_tokens_by_arm",
                "drafter_swaps", "spec_fallbacks", "drafter_records", "drafter_sink_errors")
        return JSONResponse({"drafter_version": engine.drafter_version, "speculation": st.get("speculation"),
                             "accept_length": 1 + st.get("spec_accepted_tokens", 0) / rounds if rounds else None,
                             **{k: st.get(k) for k in keys}})

    @app.post("/set_speculation")
    async def set_speculation(request: Request):
        req = schemas.parse(schemas.SetSpeculationReq, await request.body())
        try:
            engine.set_speculation(req.mode)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return JSONResponse({"success": True, "speculation": engine.get_stats().get("speculation")})

    @app.get("/get_round_log")
    async def get_round_log(clear: bool = False):
        """Decode rounds (arm, batch size, tokens, seconds): the rollout timeline."""
        return JSONResponse({"rounds": engine.get_round_log(clear=clear)})

    def _weights_ok(message: str):
        return JSONResponse({"success": True, "message": message, "num_paused_requests": 0,
                             "weight_version": engine.weight_version})

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(request: Request):
        req = schemas.parse(schemas.GetWeightsByNameReq, await request.body())
        try:
            t = engine.get_weights_by_name(req.name)
        except KeyError:
            raise ApiError(400, f"unknown weight name {req.name!r}") from None
        return JSONResponse(t[: req.truncate_size].float().tolist())

    @app.get("/get_weights_checksum")
    async def get_weights_checksum(request: Request):
        if "weights" in engine.released_memory:
            raise ApiError(503, "weights are released: resume_memory_occupation first")
        h = hashlib.sha256()
        for name, t in sorted(engine.weights.named_hf_tensors(), key=lambda x: x[0]):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        return JSONResponse({"checksum": h.hexdigest(), "weight_version": engine.weight_version})

    @app.get("/get_weight_version")
    async def get_weight_version(request: Request):
        return JSONResponse({"weight_version": engine.weight_version})

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request):
        req = schemas.parse(schemas.UpdateWeightVersionReq, await request.body())
        if req.abort_all_requests:
            engine.abort_request(abort_all=True)
        engine.weight_version = req.new_version
        return JSONResponse({"success": True, "message": f"Weight version updated to {req.new_version}",
                             "new_version": req.new_version})

    # ------------------------------------------------------------------------------------------ control
    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        req = schemas.parse(schemas.PauseGenerationReq, await request.body(), allow_empty=True)
        if req.mode == "abort":
            engine.abort_request(abort_all=True)
        engine.pause_generation()
        state.paused = True
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok", "mode": req.mode})

    @app.post("/continue_generation")
    async def continue_generation(request: Request):
        schemas.parse(schemas.ContinueGenerationReq, await request.body(), allow_empty=True)
        engine.continue_generation()
        state.paused = False
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    @app.post("/abort_request")
    async def abort_request(request: Request):
        req = schemas.parse(schemas.AbortReq, await request.body())
        if req.abort_all:
            engine.abort_request(abort_all=True)
        elif req.rid:
            engine.abort_request(req.rid)  # an unknown rid is no error: the request may just have ended
        else:
            raise ApiError(400, "give a 'rid' or 'abort_all': true")
        return JSONResponse({"success": True, "message": "aborted"})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(request: Request):
        if engine.flush_cache():
            return JSONResponse({"success": True, "message": "Cache flushed."})
        return JSONResponse({"success": False, "message": "Cache not flushed: requests are in flight."},
                            status_code=400)

    # ------------------------------------------------------------------------------------------ status
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    @app.api_route("/health_generate", methods=["GET", "POST"])
    async def health_generate(request: Request):
        if state.paused:  # healthy, but a probe would wait for /continue_generation
            return JSONResponse({"status": "ok", "paused": True})
        rid = f"health-{new_rid()}"
        try:
            await asyncio.wait_for(engine.async_generate(input_ids=[0], rid=rid,
                                                         sampling_params={"max_new_tokens": 1}),
                                   HEALTH_GENERATE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", reported, not raised
            engine.abort_request(rid)
            return error_response(503, f"health check generation failed: {type(e).__name__}: {e}")
        return JSONResponse({"status": "ok"})

    @app.get("/get_model_info")
    async def get_model_info(request: Request):
        info = engine.get_model_info()
        info.update(served_model_name=state.model_name, preferred_sampling_params=None)
        return JSONResponse(info)

    async def get_server_info(request: Request):
        stats = engine.get_stats()
        return JSONResponse({
            **opts.server_args,
            "engine_config": dataclasses.asdict(engine.config),
            "served_model_name": state.model_name,
            "weight_version": engine.weight_version,
            "max_total_num_tokens": stats["kv_capacity_tokens"],
            "paused": state.paused,
            "internal_states": [stats],
            "version": _version(),
        })

    app.add_api_route("/get_server_info", get_server_info, methods=["GET"])
    app.add_api_route("/server_info", get_server_info, methods=["GET"])

    @app.get("/get_load")
    async def get_load(request: Request):
        s = engine.get_stats()
        return JSONResponse([{"dp_rank": 0, "num_reqs": s["running"] + s["waiting"],
                              "num_waiting_reqs": s["waiting"], "num_tokens": s["kv_used_tokens"]}])

    @app.get("/v1/loads")
    async def v1_loads(request: Request):
        s = engine.get_stats()
        return JSONResponse({"loads": [{"dp_rank": 0, "num_running_reqs": s["running"],
                                        "num_waiting_reqs": s["waiting"],
                                        "num_total_reqs": s["running"] + s["waiting"],
                                        "num_used_tokens": s["kv_used_tokens"],
                                        "max_total_num_tokens": s["kv_capacity_tokens"]}]})

    @app.get("/metrics")
    async def prometheus(request: Request):
        text = metrics.render(engine.get_stats(), {"model_name": state.model_name})
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    add_openai_routes(app, state)

    metrics.known_paths.update(r.path for r in app.routes if hasattr(r, "path"))
    _install_error_handlers(app)
    app.add_middleware(
        GuardMiddleware, api_key=api_key, default_limit=opts.max_request_bytes,
        limits={"/update_weights_from_tensor": opts.max_weights_request_bytes},
        open_paths=("/health",), on_response=metrics.on_response,
    )
    return app


# ---------------------------------------------------------------------------------------------- helpers
def _generate_kwargs(req: schemas.GenerateReqInput) -> tuple[dict, list[str]]:
    """Engine.async_generate arguments for a /generate body, and the request ids it will carry."""
    batch = isinstance(req.text, list) or (req.input_ids is not None and len(req.input_ids) > 0
                                           and isinstance(req.input_ids[0], list))
    size = len(req.text) if isinstance(req.text, list) else (len(req.input_ids) if batch else 1)
    if batch:
        if isinstance(req.rid, list):
            rids = list(req.rid)
        else:  # as SGLang: a single rid is a prefix for the items of a batch
            prefix = req.rid or new_rid()
            rids = [f"{prefix}_{i}" for i in range(size)]
    else:
        if isinstance(req.rid, list):
            raise ApiError(400, "'rid' must be a string for a single prompt")
        rids = [req.rid or new_rid()]
    kwargs = dict(
        prompt=req.text, input_ids=req.input_ids, sampling_params=req.sampling_params,
        rid=rids if batch else rids[0],
        return_logprob=bool(_uniform(req.return_logprob, "return_logprob")),
        logprob_start_len=_uniform(req.logprob_start_len, "logprob_start_len"),
        top_logprobs_num=_uniform(req.top_logprobs_num, "top_logprobs_num"),
        return_text_in_logprobs=req.return_text_in_logprobs,
    )
    return kwargs, rids


def _uniform(value, name: str):
    """SGLang takes some fields per batch item; tlt takes one value for the whole batch."""
    if not isinstance(value, list):
        return value
    if len(set(value)) > 1:
        raise ApiError(400, f"per-item values of {name!r} differ; tlt takes one value per request")
    return value[0] if value else None


async def _native_stream(it, state: ServerState, t0: float):
    try:
        async for out in it:
            yield sse(out)
        state.metrics.observe_latency(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - the status line is sent already: report in the stream
        if as_api_error(e) is None:
            logger.exception("stream failed")
        yield sse_error(e)
    finally:
        await it.aclose()
    yield SSE_DONE


def _weights_error(status: int, message: str) -> ApiError:
    return ApiError(status, message, {"success": False, "message": message})


def _weights_guard(fn):
    """Run a weight-update step; bad input -> ApiError carrying SGLang's `success: false` body too."""
    try:
        return fn()
    except ApiError as e:
        raise _weights_error(e.status, e.message) from None
    except (ValueError, TypeError, OSError, TensorCodecError) as e:
        raise _weights_error(400, f"weight update rejected, weights unchanged: {e}") from None


def _merge(parts: list[list]) -> list:
    seen: set[str] = set()
    merged = []
    for part in parts:
        for name, t in part:
            if name in seen:
                raise ValueError(f"tensor {name!r} appears in more than one serialized_named_tensors entry")
            seen.add(name)
            merged.append((name, t))
    return merged


def _query_bool(q: dict, name: str) -> bool:
    v = q.get(name, "false").lower()
    if v not in ("true", "false", "1", "0"):
        raise ApiError(400, f"query parameter {name!r} must be true or false")
    return v in ("true", "1")


def _version() -> str:
    import tlt

    return tlt.__version__


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path}"
        elif e.status_code == 405:
            msg = f"method {request.method} is not allowed for {request.url.path}"
        else:
            msg = str(e.detail)
        return error_response(e.status_code, msg, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(400, f"invalid request: {e.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        mapped = as_api_error(e)
        if mapped is not None:
            return error_response(mapped.status, mapped.message)
        logger.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `tlt serve` flags (SGLang `launch_server` names); adds them to `parser` if given."""
    p = parser or argparse.ArgumentParser(
        prog="tlt serve", description="Serve a model over SGLang's native HTTP API and the OpenAI API.")
    g = p.add_argument_group("model")
    g.add_argument("--model-path", default=None,
                   help="HF folder (config.json + safetensors) or .gguf file; default: embedded SmolLM2-135M")
    g.add_argument("--tokenizer-path", default=None, help="default: the model's own tokenizer")
    g.add_argument("--served-model-name", default=None, help="model name in the OpenAI API (default: path)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--context-length", type=int, default=None, help="default: the model's")
    g.add_argument("--weight-version", default="default", help="version label of the initial weights")
    g = p.add_argument_group("engine")
    g.add_argument("--max-running-requests", type=int, default=256, help="sequences decoded together at most")
    g.add_argument("--max-prefill-tokens", type=int, default=8192, help="padded tokens in one prefill batch")
    g.add_argument("--kv-cache-bytes", type=int, default=None, help="KV-cache budget in bytes")
    g.add_argument("--mem-fraction-static", type=float, default=0.85,
                   help="CUDA: memory fraction for weights + KV")
    g.add_argument("--random-seed", type=int, default=None)
    g.add_argument("--enable-deterministic-inference", action="store_true",
                   help="batch-invariant kernels: speculative decoding emits the tokens plain decoding emits, "
                        "bfloat16 included (bfloat16 on CPUs with AVX512-BF16)")
    g.add_argument("--torch-num-threads", type=int, default=None, help="CPU threads for torch")
    for f in _speculative_fields():  # whatever speculative settings the engine has, under their SGLang names
        flag = "--" + f.name.replace("_", "-")
        t = str(f.type)
        if "bool" in t:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif "list" in t:
            g.add_argument(flag, type=lambda v: [a for a in v.split(",") if a], default=f.default,
                           help="comma-separated, e.g. s2k1n3,s3k1n4,s4k2n8")
        else:
            kind = int if "int" in t else float if "float" in t else str
            g.add_argument(flag, type=kind, default=f.default)
    g.add_argument("--drafter", dest="speculative_draft_model_path", default=None, metavar="DIR",
                   help="a drafter folder (tlt train-drafter, or the online trainer's output): "
                        "same as --speculative-draft-model-path")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback requires --api-key and --weight-roots")
    g.add_argument("--port", type=int, default=30000)
    g.add_argument("--grpc-port", type=int, default=None,
                   help="also serve the gRPC API (proto/tlt.proto) on this port, same --host, engine and API key")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    g.add_argument("--weight-roots", nargs="+", default=None, metavar="DIR",
                   help="the only folders /update_weights_from_disk may read from")
    g.add_argument("--max-request-bytes", type=int, default=64 << 20, help="body limit of a request")
    g.add_argument("--max-weights-request-bytes", type=int, default=2 << 30,
                   help="body limit of /update_weights_from_tensor")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _speculative_fields() -> list[dataclasses.Field]:
    from tlt.engine.config import EngineConfig

    return [f for f in dataclasses.fields(EngineConfig) if f.name.startswith("speculative_")]


def exposure_error(args: argparse.Namespace) -> str | None:
    """Why these flags must not start a server (None if they may)."""
    if args.api_key is not None and not args.api_key.strip():
        return "--api-key must not be empty"
    for root in args.weight_roots or []:
        if not os.path.isdir(root):
            return f"--weight-roots: {root!r} is not a directory"
    if not is_loopback(args.host):
        if not args.api_key:
            return (f"--host {args.host} makes the server reachable from other machines: "
                    "give --api-key (and --weight-roots)")
        if not args.weight_roots:
            return (f"--host {args.host} makes the server reachable from other machines: give --weight-roots "
                    "to say which folders /update_weights_from_disk may read")
    for name in ("max_request_bytes", "max_weights_request_bytes"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be > 0"
    return None


def serve(args: argparse.Namespace) -> int:
    """Start the engine and the server (blocks until stopped); returns the exit status."""
    import uvicorn

    err = exposure_error(args)
    if err:
        print(f"tlt serve: error: {err}", file=sys.stderr)
        return 2
    # Created on this thread, which runs uvicorn's event loop below: one thread does all torch work.
    engine = Engine(
        model_path=args.model_path, tokenizer_path=args.tokenizer_path, dtype=args.dtype, device=args.device,
        context_length=args.context_length, kv_cache_bytes=args.kv_cache_bytes,
        mem_fraction_static=args.mem_fraction_static, max_running_requests=args.max_running_requests,
        max_prefill_tokens=args.max_prefill_tokens, random_seed=args.random_seed,
        enable_deterministic_inference=args.enable_deterministic_inference, weight_version=args.weight_version,
        torch_num_threads=args.torch_num_threads,
        log_level=args.log_level, **{f.name: getattr(args, f.name) for f in _speculative_fields()},
    )
    shown = {k: v for k, v in vars(args).items() if k != "api_key" and not callable(v)}
    shown["api_key"] = "<set>" if args.api_key else None
    app = create_app(engine, api_key=args.api_key, weight_roots=args.weight_roots,
                     max_request_bytes=args.max_request_bytes,
                     max_weights_request_bytes=args.max_weights_request_bytes,
                     served_model_name=args.served_model_name, server_args=shown)
    try:
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
        asyncio.run(_serve_http_and_grpc(uvicorn.Server(config), app.state.tlt, args))
    finally:
        engine.shutdown()
    return 0


async def _serve_http_and_grpc(http, state: ServerState, args: argparse.Namespace) -> None:
    """uvicorn, and the gRPC server with --grpc-port, on this thread's one event loop (see grpc_server.py)."""
    grpc_server = None
    if args.grpc_port is not None:
        from tlt.rl_bridge.grpc_server import start_grpc_server

        grpc_server = await start_grpc_server(state, args.host, args.grpc_port)
    try:
        await http.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=2)


def main(argv: list[str] | None = None) -> int:
    """`tlt serve ...` / `python -m tlt.rl_bridge.http_server ...`."""
    return serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
