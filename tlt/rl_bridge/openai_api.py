"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (streaming and logprobs).

Requests become `Engine.async_generate` calls; the chat template is the tokenizer's own
(`tokenizer.apply_chat_template`). The model name in a request is not checked (as SGLang): one server
serves one model. Streaming serves one prompt with n=1.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request

from tlt.rl_bridge import schemas
from tlt.rl_bridge.errors import ApiError, JSONResponse
from tlt.rl_bridge.serving import (
    SSE_DONE,
    EventStream,
    ServerState,
    as_api_error,
    generate_or_abort,
    new_rid,
    open_stream,
    sse,
    sse_error,
)

logger = logging.getLogger("tlt.http")


def add_openai_routes(app: FastAPI, state: ServerState) -> None:
    """Register the /v1 routes on `app`."""
    engine = state.engine

    async def list_models(request: Request):
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    async def retrieve_model(request: Request):
        model = request.path_params["model"]
        if model != state.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{state.model_name!r}")
        return JSONResponse(_model_card(state))

    async def completions(request: Request):
        req = schemas.parse(schemas.CompletionRequest, await request.body())
        texts, id_lists = _completion_prompts(req.prompt)
        n_prompts = len(texts or id_lists)
        max_tokens = req.max_tokens if req.max_tokens is not None else engine.context_length
        want_lp = req.logprobs is not None
        kwargs = dict(
            prompt=texts, input_ids=id_lists, sampling_params=req.sampling_params(max_tokens),
            return_logprob=want_lp, top_logprobs_num=req.logprobs or 0, return_text_in_logprobs=True,
            logprob_start_len=0 if (req.echo and want_lp) else None,
        )
        echo_texts = None
        if req.echo:
            echo_texts = texts if texts is not None else [engine.tokenizer.decode(ids) for ids in id_lists]
        meta = _Meta("cmpl", req.model or state.model_name)
        if req.stream:
            if n_prompts != 1 or req.n != 1:
                raise ApiError(400, "streaming serves one prompt with n=1")
            kwargs["rid"] = req.rid or new_rid()
            it = await open_stream(engine, **{**kwargs, "prompt": texts[0] if texts else None,
                                              "input_ids": id_lists[0] if id_lists else None})
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            echo = echo_texts[0] if echo_texts else None
            return EventStream(_completion_stream(it, meta, echo, include_usage))
        rid = req.rid or new_rid()
        rids = [f"{rid}_{i}" for i in range(n_prompts)]
        outs = await generate_or_abort(request, engine, rids, rid=rids, **kwargs)
        choices = []
        for i, out in enumerate(outs):
            m = out["meta_info"]
            text = out["text"]
            lp = None
            if want_lp:
                entries = list(m.get("output_token_logprobs", []))
                tops = list(m.get("output_top_logprobs", [])) if req.logprobs else None
                if req.echo:
                    entries = list(m.get("input_token_logprobs", [])) + entries
                    if tops is not None:
                        tops = list(m.get("input_top_logprobs", [])) + tops
                lp = _completion_logprobs(entries, tops)
            if echo_texts is not None:
                text = echo_texts[i // req.n] + text
            choices.append({"index": i, "text": text, "logprobs": lp, **_finish(m)})
        usage = _usage(outs, req.n)
        return JSONResponse({**meta.head("text_completion"), "choices": choices, "usage": usage})

    async def chat_completions(request: Request):
        req = schemas.parse(schemas.ChatCompletionRequest, await request.body())
        ids = _chat_prompt_ids(engine.tokenizer, req)
        max_tokens = next((x for x in (req.max_completion_tokens, req.max_tokens) if x is not None),
                          engine.context_length)  # the engine clips it to the room left in the context
        kwargs = dict(input_ids=ids, sampling_params=req.sampling_params(max_tokens),
                      return_logprob=req.logprobs,
                      top_logprobs_num=(req.top_logprobs or 0) if req.logprobs else 0,
                      return_text_in_logprobs=True, rid=req.rid or new_rid())
        meta = _Meta("chatcmpl", req.model or state.model_name)
        if req.stream:
            if req.n != 1:
                raise ApiError(400, "streaming serves n=1")
            it = await open_stream(engine, **kwargs)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(_chat_stream(it, meta, req.logprobs, include_usage))
        out = await generate_or_abort(request, engine, [kwargs["rid"]], **kwargs)
        outs = out if isinstance(out, list) else [out]
        choices = []
        for i, o in enumerate(outs):
            m = o["meta_info"]
            lp = {"content": _chat_logprobs(m.get("output_token_logprobs", []),
                                            m.get("output_top_logprobs"))} if req.logprobs else None
            message = {"role": "assistant", "content": o["text"], "tool_calls": None}
            choices.append({"index": i, "message": message, "logprobs": lp, **_finish(m)})
        usage = _usage(outs, req.n)
        return JSONResponse({**meta.head("chat.completion"), "choices": choices, "usage": usage})

    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", retrieve_model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])


# ---------------------------------------------------------------------------------------------- requests
def _completion_prompts(prompt) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(prompt, str):
        return [prompt], None
    if not prompt:
        raise ApiError(400, "prompt must not be empty")
    if isinstance(prompt[0], str):
        return list(prompt), None
    if isinstance(prompt[0], int):
        return None, [list(prompt)]
    return None, [list(p) for p in prompt]


def _flatten_content(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"only text content parts are supported, got type {part.get('type')!r}")
        parts.append(part["text"])
    return "\n".join(parts)


def _chat_prompt_ids(tokenizer, req: schemas.ChatCompletionRequest) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
    messages = []
    for m in req.messages:
        d = {k: v for k, v in m.model_dump().items() if v is not None}
        d["content"] = _flatten_content(m.content)
        messages.append(d)
    cont = req.continue_final_message
    if cont and messages[-1]["role"] != "assistant":
        raise ApiError(400, "continue_final_message needs an assistant message last")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not cont,
                                             continue_final_message=cont, **(req.chat_template_kwargs or {}))
    except Exception as e:  # noqa: BLE001 - template errors (jinja, bad kwargs) are the request's fault
        raise ApiError(400, f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------- responses
class _Meta:
    def __init__(self, prefix: str, model: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def _model_card(state: ServerState) -> dict[str, Any]:
    name = state.model_name
    return {"id": name, "object": "model", "created": int(state.metrics.started), "owned_by": "tlt",
            "root": name, "max_model_len": state.engine.context_length}


def _finish(meta: dict) -> dict[str, Any]:
    fr = meta.get("finish_reason")
    if fr is None:
        return {"finish_reason": None}
    out: dict[str, Any] = {"finish_reason": fr.get("type")}
    if fr.get("type") == "stop":
        out["matched_stop"] = fr.get("matched")
    return out


def _usage(outs: list[dict], n: int) -> dict[str, int]:
    prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs[::n])
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(entries: list, tops: list | None, offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy logprobs object from SGLang (logprob, token_id, text) tuples."""
    tokens = [e[2] for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t or "")
    return {
        "tokens": tokens,
        "token_logprobs": [e[0] for e in entries],
        "top_logprobs": None if tops is None else [None if t is None else {x[2]: x[0] for x in t}
                                                   for t in tops],
        "text_offset": offsets,
    }


def _chat_logprobs(entries: list, tops: list | None) -> list[dict[str, Any]]:
    def item(lp, text):
        text = text or ""
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    out = []
    for i, (lp, _, text) in enumerate(entries):
        d = item(lp, text)
        d["top_logprobs"] = [item(x[0], x[2]) for x in tops[i]] if tops else []
        out.append(d)
    return out


class _Delta:
    """Turns "everything so far" outputs into deltas; holds back a trailing partial UTF-8 character."""

    def __init__(self):
        self.text = ""
        self.tokens = 0

    def step(self, out: dict) -> tuple[str, int, int, bool]:
        finished = out["meta_info"].get("finish_reason") is not None
        text = out["text"] if finished else out["text"].rstrip("\ufffd")
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += delta
        start, self.tokens = self.tokens, len(out["output_ids"])
        return delta, start, self.tokens, finished


async def _completion_stream(it, meta: _Meta, echo: str | None, include_usage: bool):
    d = _Delta()
    last = None
    try:
        if echo:
            yield sse({**meta.head("text_completion"),
                       "choices": [{"index": 0, "text": echo, "logprobs": None, "finish_reason": None}]})
        async for out in it:
            last = out
            delta, a, b, finished = d.step(out)
            m = out["meta_info"]
            lp = None
            if "output_token_logprobs" in m:
                tops = m.get("output_top_logprobs")
                lp = _completion_logprobs(m["output_token_logprobs"][a:b], tops[a:b] if tops else None)
            if delta or finished or lp:
                yield sse({**meta.head("text_completion"),
                           "choices": [{"index": 0, "text": delta, "logprobs": lp, **_finish(m)}]})
        if include_usage and last is not None:
            yield sse({**meta.head("text_completion"), "choices": [], "usage": _usage([last], 1)})
    except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream
        if as_api_error(e) is None:
            logger.exception("completion stream failed")
        yield sse_error(e)
    finally:
        await it.aclose()
    yield SSE_DONE


async def _chat_stream(it, meta: _Meta, want_lp: bool, include_usage: bool):
    d = _Delta()
    last = None
    head = meta.head("chat.completion.chunk")
    try:
        yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
        async for out in it:
            last = out
            delta, a, b, finished = d.step(out)
            m = out["meta_info"]
            lp = None
            if want_lp:
                tops = m.get("output_top_logprobs")
                entries = m.get("output_token_logprobs", [])[a:b]
                lp = {"content": _chat_logprobs(entries, tops[a:b] if tops else None)}
            if delta or finished or (lp and lp["content"]):
                yield sse({**head, "choices": [{"index": 0, "delta": {"content": delta} if delta else {},
                                                "logprobs": lp, **_finish(m)}]})
        if include_usage and last is not None:
            yield sse({**head, "choices": [], "usage": _usage([last], 1)})
    except Exception as e:  # noqa: BLE001
        if as_api_error(e) is None:
            logger.exception("chat stream failed")
        yield sse_error(e)
    finally:
        await it.aclose()
    yield SSE_DONE
