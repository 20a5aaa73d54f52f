"""The HTTP server's operations over gRPC (proto/tlt.proto): Generate (unary and server streaming),
UpdateWeights (client-streamed safetensors chunks), ModelInfo, Health, Abort, GetStats.

`tlt serve --grpc-port N` starts it beside HTTP, bound to the same --host (127.0.0.1 by default), on the
same engine and the same event loop: grpc.aio handlers run on the loop that uvicorn runs, so generations
are awaited with `Engine.async_generate` exactly as the HTTP routes do and every torch operation stays on
one thread (see serving.py). A thread-pool gRPC server would step the engine from its worker threads.

It shares the HTTP server's state: --api-key (metadata `authorization: Bearer KEY` on every method but
Health), --max-request-bytes (the largest message), --max-weights-request-bytes (the largest weight
update), pause state. Errors are gRPC status codes with the message the HTTP API gives (400 ->
INVALID_ARGUMENT, 503 -> UNAVAILABLE, ...); a rejected weight update leaves the weights unchanged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

import grpc

from tlt.rl_bridge.errors import dumps
from tlt.rl_bridge.grpc_messages import output_pb, sampling_params_dict
from tlt.rl_bridge.proto import tlt_pb2 as pb
from tlt.rl_bridge.proto import tlt_pb2_grpc as pb_grpc
from tlt.rl_bridge.serving import ServerState, as_api_error, new_rid
from tlt.rl_bridge.tensor_codec import decode_named_tensors

logger = logging.getLogger("tlt.grpc")

HEALTH_GENERATE_TIMEOUT_S = 20.0
_OPEN_METHODS = frozenset({"/tlt.v1.Tlt/Health"})
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


async def _fail(context: grpc.aio.ServicerContext, e: BaseException, what: str = "") -> None:
    """End the call with the status the HTTP API would give `e` (INTERNAL for a real fault)."""
    mapped = as_api_error(e)
    if mapped is None:
        logger.exception("internal error in %s", what or "a gRPC call", exc_info=e)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
    await context.abort(_CODES.get(mapped.status, grpc.StatusCode.INVALID_ARGUMENT), mapped.message)


class TltServicer(pb_grpc.TltServicer):
    """The methods of `service Tlt`, over the engine and options of one HTTP app."""

    def __init__(self, state: ServerState):
        self.state = state
        self.engine = state.engine

    def _generate_kwargs(self, request: pb.GenerateRequest) -> dict:
        which = request.WhichOneof("prompt")
        if which is None:
            raise ValueError("give 'text' or 'input_ids'")
        return dict(
            prompt=request.text if which == "text" else None,
            input_ids=list(request.input_ids.ids) if which == "input_ids" else None,
            sampling_params=sampling_params_dict(request.sampling_params),
            rid=request.rid or new_rid(),
            return_logprob=request.return_logprob,
            logprob_start_len=request.logprob_start_len if request.HasField("logprob_start_len") else None,
            top_logprobs_num=request.top_logprobs_num,
            return_text_in_logprobs=request.return_text_in_logprobs,
        )

    async def Generate(self, request, context):
        try:
            kwargs = self._generate_kwargs(request)
        except ValueError as e:
            await _fail(context, e)
        try:
            outs = await self.engine.async_generate(**kwargs)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            self.engine.abort_request(kwargs["rid"])
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            await _fail(context, e, "Generate")
        outs = outs if isinstance(outs, list) else [outs]
        return pb.GenerateResponse(outputs=[output_pb(o) for o in outs])

    async def GenerateStream(self, request, context):
        try:
            it = await self.engine.async_generate(stream=True, **self._generate_kwargs(request))
        except Exception as e:  # noqa: BLE001
            await _fail(context, e, "GenerateStream")
        try:
            async for out in it:
                yield pb.GenerateResponse(outputs=[output_pb(out)])
        except Exception as e:  # noqa: BLE001
            await _fail(context, e, "GenerateStream")
        finally:
            await it.aclose()  # a cancelled call aborts its request here

    async def UpdateWeights(self, request_iterator, context):
        limit = self.state.options.max_weights_request_bytes
        parts: list[bytes] = []
        size, first = 0, None
        async for chunk in request_iterator:
            if first is None:
                first = chunk
            size += len(chunk.data)
            if size > limit:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"weight update exceeds the limit of {limit} bytes; weights unchanged")
            parts.append(chunk.data)
        if first is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no chunks: the weight update is empty")
        if first.total_bytes and size != first.total_bytes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"weight update cut short: {size} of {first.total_bytes} bytes arrived; "
                                "weights unchanged")
        version = first.weight_version if first.HasField("weight_version") else None
        try:
            named = decode_named_tensors(b"".join(parts))
            if not named:
                raise ValueError("no tensors in the update")
            if first.abort_all_requests:
                self.engine.abort_request(abort_all=True)
            _, message = self.engine.update_weights_from_tensor(named, weight_version=version)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, (ValueError, TypeError)):
                e = ValueError(f"weight update rejected, weights unchanged: {e}")
            await _fail(context, e, "UpdateWeights")
        return pb.UpdateWeightsResponse(success=True, message=message, weight_version=self.engine.weight_version)

    async def ModelInfo(self, request, context):
        info = self.engine.get_model_info()
        fields = {k: v for k, v in info.items() if k in pb.ModelInfoResponse.DESCRIPTOR.fields_by_name}
        fields = {k: str(v) if k.endswith("_path") else v for k, v in fields.items() if v is not None}
        return pb.ModelInfoResponse(served_model_name=self.state.model_name, **fields)

    async def Health(self, request, context):
        if request.generate and not self.state.paused:
            rid = f"health-{new_rid()}"
            try:
                await asyncio.wait_for(self.engine.async_generate(input_ids=[0], rid=rid,
                                                                  sampling_params={"max_new_tokens": 1}),
                                       HEALTH_GENERATE_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
                self.engine.abort_request(rid)
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"health check generation failed: {type(e).__name__}: {e}")
        return pb.HealthResponse(status="ok", paused=self.state.paused)

    async def Abort(self, request, context):
        if request.abort_all:
            self.engine.abort_request(abort_all=True)
        elif request.rid:
            self.engine.abort_request(request.rid)  # an unknown rid is no error: it may just have ended
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give a 'rid' or 'abort_all': true")
        return pb.AbortResponse(success=True, message="aborted")

    async def GetStats(self, request, context):
        resp = pb.GetStatsResponse()
        resp.stats.update(json.loads(dumps(self.engine.get_stats())))  # JSON-safe: str keys, no NaN
        return resp


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every method but Health needs `authorization: Bearer KEY` (constant-time compare, as HTTP)."""

    def __init__(self, api_key: str):
        self.key = api_key.encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in _OPEN_METHODS:
            return handler
        auth = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return handler
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call."""
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong API key: send metadata 'authorization: Bearer <key>'")

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming,
                                                                 handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


async def start_grpc_server(state: ServerState, host: str, port: int) -> grpc.aio.Server:
    """Start serving `state`'s engine on host:port, on the running event loop; returns the server."""
    opts = state.options
    server = grpc.aio.server(
        interceptors=[_ApiKeyInterceptor(opts.api_key)] if opts.api_key else None,
        options=[("grpc.max_receive_message_length", opts.max_request_bytes),
                 ("grpc.max_send_message_length", opts.max_request_bytes)])
    pb_grpc.add_TltServicer_to_server(TltServicer(state), server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gRPC: cannot bind {address}")
    await server.start()
    logger.info("gRPC serving on %s", address)
    return server
