"""Request bodies of the HTTP API (pydantic v2), with SGLang's and OpenAI's field names.

Types are strict (`"5"` is not an int, `1` is not a bool). Fields that SGLang or OpenAI define but tlt
cannot serve are accepted only empty (null, false, 0, "", [], {}) because clients send them that way;
anything else, and any field nobody defines, is refused with a message naming it. Sampling parameters
are passed through as a dict and validated by the engine's `SamplingParams`, the single authority on
their names and ranges.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tlt.rl_bridge.errors import ApiError


def is_empty(value: Any) -> bool:
    """None, False, 0, "", or a container of empty values (`image_data: [[], null]` for a batch)."""
    if isinstance(value, (list, tuple)):
        return all(is_empty(v) for v in value)
    if isinstance(value, dict):
        return all(is_empty(v) for v in value.values())
    return value is None or value is False or value == 0 or value == ""


def _check_extras(model: BaseModel, empty_only: frozenset[str], ignored: frozenset[str], what: str) -> None:
    for key, value in (model.model_extra or {}).items():
        if key in ignored:
            continue
        if key in empty_only:
            if not is_empty(value):
                raise ValueError(f"{key!r} is not supported by tlt (only an empty value is accepted)")
            continue
        raise ValueError(f"unknown field {key!r} for {what}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _WithExtras(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


def parse(model: type[BaseModel], body: bytes, allow_empty: bool = False) -> BaseModel:
    """Validate a JSON body; ApiError(400) with a readable message on any fault."""
    if not body.strip():
        if allow_empty:
            return model()
        raise ApiError(400, "request body is empty; a JSON object is expected")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise ApiError(400, format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False)[:5]:
        if err["type"] == "json_invalid":
            return f"malformed JSON: {err['msg']}"
        if err["type"] in ("model_type", "model_attributes_type") and not err["loc"]:
            return "request body must be a JSON object"
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


# ---------------------------------------------------------------------------------------------- native
# GenerateReqInput fields (sglang/srt/managers/io_struct.py) that tlt cannot serve: accepted when empty.
_GENERATE_EMPTY_ONLY = frozenset({
    "image_data", "video_data", "audio_data", "input_embeds", "mm_hashes", "mm_content_hashes",
    "use_audio_in_video", "video_config", "token_ids_logprob", "return_sampling_mask",
    "return_flat_raw_top_logprobs", "return_flat_raw_top_logprobs_b64", "return_hidden_states",
    "return_routed_experts", "routed_experts_start_len", "return_indexer_topk", "modalities",
    "session_params",
    "lora_path", "lora_id", "custom_logit_processor", "positional_embed_overrides", "bootstrap_host",
    "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size", "routed_dp_rank",
    "data_parallel_rank", "disagg_prefill_dp_rank", "kv_router_hint", "background", "require_reasoning",
    "max_thinking_tokens", "return_bytes", "return_entropy", "return_prompt_token_ids",
    "need_wait_for_mm_inputs",
    "num_items_assigned", "encoder_urls", "max_dynamic_patch", "min_dynamic_patch", "image_max_dynamic_patch",
    "video_max_dynamic_patch", "images_config", "multi_item_delimiter_indices", "cache_salt",
})
# Fields that only label or log a request: accepted with any value and ignored.
_GENERATE_IGNORED = frozenset({
    "log_metrics", "no_logs", "session_id", "conversation_id", "routing_key", "custom_labels", "extra_key",
    "received_time", "external_trace_header", "priority", "http_worker_ipc",
})


class GenerateReqInput(_WithExtras):
    """POST /generate (SGLang `GenerateReqInput`)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False

    @model_validator(mode="after")
    def _extras(self):
        _check_extras(self, _GENERATE_EMPTY_ONLY, _GENERATE_IGNORED, "/generate")
        if self.text is None and self.input_ids is None:
            raise ValueError("give 'text' or 'input_ids'")
        if self.text is not None and self.input_ids is not None:
            raise ValueError("give only one of 'text' or 'input_ids'")
        return self


class UpdateDrafterReq(_Strict):
    """POST /update_drafter (tlt): swap in the drafter folder at `path` between two decode rounds."""

    path: str
    version: str | None = None


class SetSpeculationReq(_Strict):
    """POST /set_speculation (tlt): 'adaptive', 'off', or one arm such as 's3k1n4'."""

    mode: str


class UpdateWeightsFromDiskReq(_Strict):
    """POST /update_weights_from_disk (SGLang `UpdateWeightFromDiskReqInput`)."""

    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    abort_all_request: bool | None = None  # older AReaL clients spell it so (areal/engine/sglang_remote.py)
    weight_version: str | None = None
    flush_cache: bool = True
    # SGLang scheduling knobs that change nothing here
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0


class UpdateWeightsFromTensorReq(_Strict):
    """POST /update_weights_from_tensor, JSON form (see tensor_codec for the format)."""

    serialized_named_tensors: list[str] | str
    load_format: Literal["safetensors"] | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


class PauseGenerationReq(_Strict):
    """POST /pause_generation. `abort` (SGLang's default) aborts what is in flight; `in_place` and
    `retract` keep it, with its KV, until /continue_generation."""

    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGenerationReq(_Strict):
    torch_empty_cache: bool = False


class AbortReq(_Strict):
    """POST /abort_request (SGLang `AbortReq`)."""

    rid: str | None = ""
    abort_all: bool = False


class GetWeightsByNameReq(_Strict):
    name: str
    truncate_size: int = Field(default=100, ge=1)


class UpdateWeightVersionReq(_Strict):
    new_version: str
    abort_all_requests: bool = False


class InitWeightsUpdateGroupReq(_Strict):
    """POST /init_weights_update_group (SGLang `InitWeightsUpdateGroupReqInput`): the trainer is rank 0."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedReq(_Strict):
    """POST /update_weights_from_distributed (SGLang `UpdateWeightsFromDistributedReqInput`)."""

    names: list[str]
    dtypes: list[str]  # "bfloat16" (slime strips "torch."); "torch.bfloat16" is accepted too
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None
    # SGLang knobs that change nothing here (no prefix cache survives an update; memory is not pooled)
    flush_cache: bool = True
    torch_empty_cache: bool = False


class DestroyWeightsUpdateGroupReq(_Strict):
    group_name: str = "weight_update_group"


class MemoryOccupationReq(_Strict):
    """POST /release_memory_occupation, /resume_memory_occupation: `tags` among kv_cache, weights,
    cuda_graph; null: kv_cache and weights."""

    tags: list[str] | None = None


# ---------------------------------------------------------------------------------------------- OpenAI
_OPENAI_EMPTY_ONLY = frozenset({
    "logit_bias", "suffix", "regex", "json_schema", "ebnf", "structural_tag", "lora_path",
    "return_hidden_states", "session_params", "custom_logit_processor", "custom_params", "tools", "functions",
    "function_call", "audio", "prediction", "web_search_options", "reasoning_effort", "bootstrap_host",
    "bootstrap_port", "bootstrap_room",
})
_OPENAI_IGNORED = frozenset({
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "separate_reasoning",
    "stream_reasoning", "priority", "extra_key", "cache_salt",
})


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _OpenAISampling(_WithExtras):
    """Sampling fields shared by completions and chat (OpenAI's, then SGLang's extensions)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    # SGLang extensions (also what the openai SDK sends from `extra_body`)
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    rid: str | None = None

    def sampling_params(self, max_new_tokens: int) -> dict[str, Any]:
        p: dict[str, Any] = {"max_new_tokens": max_new_tokens, "n": self.n}
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("stop", "stop"),
                             ("presence_penalty", "presence_penalty"),
                             ("frequency_penalty", "frequency_penalty"),
                             ("sampling_seed", "seed"), ("top_k", "top_k"), ("min_p", "min_p"),
                             ("min_new_tokens", "min_tokens"), ("repetition_penalty", "repetition_penalty"),
                             ("stop_token_ids", "stop_token_ids"), ("ignore_eos", "ignore_eos"),
                             ("skip_special_tokens", "skip_special_tokens"),
                             ("spaces_between_special_tokens", "spaces_between_special_tokens"),
                             ("no_stop_trim", "no_stop_trim")):
            value = getattr(self, theirs)
            if value is not None:
                p[ours] = value
        return p


class CompletionRequest(_OpenAISampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None

    @model_validator(mode="after")
    def _extras(self):
        _check_extras(self, _OPENAI_EMPTY_ONLY, _OPENAI_IGNORED, "/v1/completions")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of other than n is not supported")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")
        return self


class ChatMessage(BaseModel):
    """One message; extra keys (name, tool_calls, tool_call_id, ...) go to the chat template as given."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_OpenAISampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _extras(self):
        _check_extras(self, _OPENAI_EMPTY_ONLY, _OPENAI_IGNORED, "/v1/chat/completions")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ValueError("top_logprobs must be in [0, 20]")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format other than {'type': 'text'} is not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool calling is not supported (tool_choice)")
        if self.modalities not in (None, [], ["text"]):
            raise ValueError("only the 'text' modality is supported")
        return self
