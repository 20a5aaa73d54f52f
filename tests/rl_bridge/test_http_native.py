"""SGLang's native API over real HTTP, driven with the exact JSON that verl, slime and AReaL send."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from server_proc import launch, num_requests, wait_for

IDS = [504, 3458, 314, 253, 1345, 30, 216]  # any in-vocabulary prompt


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    s = launch(tiny_llama, tmp_path_factory.mktemp("native"))
    yield s
    s.stop()


@pytest.fixture
def http(server):
    with server.client() as c:
        yield c


def _generate(http, payload) -> dict | list:
    r = http.post("/generate", json=payload)
    assert r.status_code == 200, r.text
    return r.json()


def _metric(http, name: str) -> float:
    text = http.get("/metrics").text
    m = re.search(rf"^tlt:{name}{{[^}}]*}} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _long(rid: str | None = None, tokens: int = 500) -> dict:  # about the whole context
    p = {"input_ids": IDS,
         "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}}
    if rid:
        p["rid"] = rid
    return p


class _Background(threading.Thread):
    """A /generate call on another thread (HTTP only: no torch work in the test process)."""

    def __init__(self, server, payload):
        super().__init__(daemon=True)
        self.server, self.payload, self.result, self.error = server, payload, None, None
        self.start()

    def run(self):
        try:
            with self.server.client(timeout=120) as c:
                self.result = c.post("/generate", json=self.payload)
        except Exception as e:  # noqa: BLE001
            self.error = e


# ---------------------------------------------------------------------------------------------- clients
def test_verl_payloads(http):
    # verl/workers/rollout/sglang_rollout/http_server_engine.py, HttpServerAdapter.launch_server_process:
    # readiness is GET /health_generate, then GET /flush_cache until 200.
    assert http.get("/health_generate").status_code == 200
    assert http.get("/flush_cache").status_code == 200
    # verl/experimental/agent_loop/agent_loop.py builds sampling_params (temperature, top_p, top_k,
    # repetition_penalty, logprobs); verl/workers/rollout/sglang_rollout/async_sglang_server.py, generate(),
    # pops "logprobs" into return_logprob and sends this GenerateReqInput:
    payload = {
        "rid": "verl-req-1",
        "input_ids": IDS,
        "sampling_params": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
                            "max_new_tokens": 6},
        "return_logprob": True,
        "image_data": None,
    }
    out = _generate(http, payload)
    # ... and reads it so:
    log_probs, token_ids = zip(*[(lp, tid) for lp, tid, _ in out["meta_info"]["output_token_logprobs"]])
    assert list(token_ids) == out["output_ids"] and len(token_ids) == 6
    assert all(lp <= 0 for lp in log_probs)
    assert out["meta_info"]["id"] == "verl-req-1"
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 6}

    # verl/workers/rollout/sglang_rollout/http_server_engine.py, HttpServerAdapter.generate: every field,
    # None values filtered out before posting.
    full = {"text": None, "sampling_params": {"temperature": 0.0, "max_new_tokens": 4}, "input_ids": IDS,
            "image_data": None, "return_logprob": False, "logprob_start_len": None, "top_logprobs_num": None,
            "token_ids_logprob": None, "lora_path": None, "custom_logit_processor": None}
    out = _generate(http, {k: v for k, v in full.items() if v is not None})
    assert len(out["output_ids"]) == 4 and "output_token_logprobs" not in out["meta_info"]
    # verl's abort_request sends an empty rid with abort_all
    assert http.post("/abort_request", json={"rid": "", "abort_all": True}).status_code == 200


def test_slime_payloads(http):
    # slime/rollout/sglang_rollout.py: GenerateState.sampling_params and generate()'s payload
    sampling_params = dict(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=6, stop=None,
                           stop_token_ids=None, skip_special_tokens=True, no_stop_trim=True,
                           spaces_between_special_tokens=False)
    payload = {"sampling_params": sampling_params, "return_logprob": True, "input_ids": IDS}
    out = _generate(http, payload)
    new_tokens = [item[1] for item in out["meta_info"]["output_token_logprobs"]]
    new_log_probs = [item[0] for item in out["meta_info"]["output_token_logprobs"]]
    assert new_tokens == out["output_ids"] and len(new_log_probs) == 6
    assert isinstance(out["text"], str)

    # --sglang-enable-deterministic-inference: slime adds a per-sample sampling_seed; same seed, same sample
    seeded = [_generate(http, {**payload, "sampling_params": {**sampling_params, "sampling_seed": 1234}})
              for _ in range(2)]
    assert seeded[0]["output_ids"] == seeded[1]["output_ids"]

    # slime/backends/sglang_utils/server_control.py, abort_server_until_idle: abort_all, then poll /v1/loads
    assert http.post("/abort_request", json={"abort_all": True}).status_code == 200
    assert num_requests(http) == 0


def test_areal_payloads(http):
    # areal/engine/sglang_remote.py, SGLangBackend.build_generation_request (greedy: temperature 0.0;
    # AReaL's default top_k is 100000000)
    sample_params = {"top_p": 1.0, "top_k": 100000000, "max_new_tokens": 6, "temperature": 0.0,
                     "stop_token_ids": [2], "ignore_eos": False, "skip_special_tokens": True,
                     "frequency_penalty": 0.0}
    payload = {"input_ids": list(IDS), "image_data": None, "sampling_params": sample_params,
               "return_logprob": True, "stream": False}
    outs = [_generate(http, payload) for _ in range(2)]
    for out in outs:  # SGLangBackend.parse_generation_response
        finish_reason = out["meta_info"]["finish_reason"]
        assert finish_reason["type"] in ("stop", "length")
        assert not finish_reason.get("message", "").startswith("Abort before prefill")
        output_tokens = [x[1] for x in out["meta_info"]["output_token_logprobs"]]
        assert output_tokens == out["output_ids"]
    assert outs[0]["output_ids"] == outs[1]["output_ids"]  # greedy
    # AReaL health check and pause/continue (payload {} each)
    assert http.get("/health").status_code == 200
    assert http.post("/pause_generation", json={}).status_code == 200
    assert http.post("/continue_generation", json={}).status_code == 200


# ---------------------------------------------------------------------------------------------- shapes
def test_text_batch_with_n_and_rid_prefix(http):
    outs = _generate(http, {"text": ["The sky", "A cat"], "rid": "bat",
                            "sampling_params": {"max_new_tokens": 3, "n": 2}})
    assert [o["meta_info"]["id"] for o in outs] == ["bat_0-0", "bat_0-1", "bat_1-0", "bat_1-1"]
    assert all(o["meta_info"]["completion_tokens"] == 3 for o in outs)
    single_n = _generate(http, {"text": "The sky", "sampling_params": {"max_new_tokens": 2, "n": 3}})
    assert isinstance(single_n, list) and len(single_n) == 3


def test_logprob_fields(http):
    out = _generate(http, {"input_ids": IDS, "sampling_params": {"max_new_tokens": 4, "temperature": 0},
                           "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3,
                           "return_text_in_logprobs": True})
    m = out["meta_info"]
    assert len(m["input_token_logprobs"]) == len(IDS) == m["prompt_tokens"]
    assert m["input_token_logprobs"][0][0] is None  # the first prompt token has no context
    assert [x[1] for x in m["input_token_logprobs"]] == IDS
    assert len(m["output_token_logprobs"]) == len(m["output_top_logprobs"]) == 4
    for (lp, tid, text), top in zip(m["output_token_logprobs"], m["output_top_logprobs"]):
        assert isinstance(text, str) and len(top) == 3
        assert top[0][1] == tid and top[0][0] == pytest.approx(lp)  # greedy: the chosen token is the top one
    assert len(m["input_top_logprobs"]) == len(IDS)
    assert m["weight_version"] == "default" and m["e2e_latency"] > 0


def test_concurrent_requests_match_sequential(server, http):
    prompts = [IDS, IDS[:3], [7, 8, 9, 10], IDS[2:]]
    payload = lambda ids: {"input_ids": ids, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}  # noqa: E731
    sequential = [_generate(http, payload(p))["output_ids"] for p in prompts]
    threads = [_Background(server, payload(p)) for p in prompts]
    for t in threads:
        t.join(60)
    assert [t.result.json()["output_ids"] for t in threads] == sequential


# ---------------------------------------------------------------------------------------------- streaming
def test_stream_sends_text_so_far_then_done(http):
    payload = {"input_ids": IDS, "sampling_params": {"max_new_tokens": 5, "temperature": 0},
               "return_logprob": True, "stream": True}
    with http.stream("POST", "/generate", json=payload) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    for a, b in zip(chunks, chunks[1:]):
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]
        assert b["text"].startswith(a["text"].rstrip("\ufffd"))
        assert a["meta_info"]["finish_reason"] is None
    last = chunks[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    assert len(last["meta_info"]["output_token_logprobs"]) == 5
    plain = _generate(http, {**payload, "stream": False})
    assert plain["output_ids"] == last["output_ids"] and plain["text"] == last["text"]


def test_stream_disconnect_aborts_the_request(server, http):
    aborted = _metric(http, "num_requests_aborted_total")
    with server.client() as c, c.stream("POST", "/generate", json={**_long(), "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    wait_for(lambda: num_requests(http) == 0, what="the stream's request to be aborted")
    assert _metric(http, "num_requests_aborted_total") == aborted + 1


def test_client_timeout_aborts_the_request(server, http):
    aborted = _metric(http, "num_requests_aborted_total")
    http.post("/pause_generation", json={"mode": "in_place"})  # the request waits: the client gives up first
    try:
        with server.client(timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/generate", json=_long())
        wait_for(lambda: _metric(http, "num_requests_aborted_total") == aborted + 1,
                 what="abort on disconnect")
        assert num_requests(http) == 0
    finally:
        http.post("/continue_generation")


# ---------------------------------------------------------------------------------------------- control
def test_abort_by_rid(server, http):
    http.post("/pause_generation", json={"mode": "in_place"})
    try:
        t = _Background(server, _long("to-abort"))
        wait_for(lambda: num_requests(http) == 1, what="the request to queue")
        assert http.post("/abort_request", json={"rid": "to-abort"}).json()["success"]
        t.join(30)
        out = t.result.json()
        assert out["meta_info"]["finish_reason"]["type"] == "abort" and out["meta_info"]["id"] == "to-abort"
        assert num_requests(http) == 0
    finally:
        http.post("/continue_generation")
    # a rid that is not (or no longer) running is not an error
    assert http.post("/abort_request", json={"rid": "to-abort"}).status_code == 200


def _stream_in_background(server, payload, chunks: list) -> threading.Thread:
    def consume():
        body = {**payload, "stream": True}
        with server.client(timeout=120) as c, c.stream("POST", "/generate", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    return t


def test_pause_in_place_keeps_requests_and_continue_finishes_them(server, http):
    chunks: list[dict] = []
    t = _stream_in_background(server, _long(), chunks)
    wait_for(lambda: len(chunks) >= 2, what="the stream to start")
    assert http.post("/pause_generation", json={"mode": "in_place"}).json()["status"] == "ok"
    assert http.get("/health_generate").status_code == 200  # healthy while paused, answered at once
    time.sleep(0.3)  # chunks already on the wire arrive
    n = len(chunks)
    time.sleep(0.5)
    assert len(chunks) == n and chunks[-1]["meta_info"]["finish_reason"] is None  # no progress while paused
    assert num_requests(http) == 1 and t.is_alive()
    assert http.get("/flush_cache").status_code == 400  # a request holds KV: not flushed, as SGLang
    assert http.post("/continue_generation").status_code == 200
    t.join(60)
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert chunks[-1]["meta_info"]["completion_tokens"] == 500
    assert http.post("/flush_cache").status_code == 200


def test_pause_default_mode_aborts_in_flight_and_holds_new_requests(server, http):
    chunks: list[dict] = []
    t = _stream_in_background(server, _long(), chunks)
    wait_for(lambda: len(chunks) >= 2, what="the stream to start")
    assert http.post("/pause_generation").json()["mode"] == "abort"  # SGLang's default (AReaL relies on it)
    t.join(30)
    last = chunks[-1]["meta_info"]
    assert last["finish_reason"]["type"] == "abort" and 2 <= last["completion_tokens"] < 500
    held = _Background(server, {"input_ids": IDS, "sampling_params": {"max_new_tokens": 2}})
    held.join(0.5)
    assert held.is_alive()  # waits for /continue_generation
    http.post("/continue_generation", json={})
    held.join(30)
    assert held.result.status_code == 200 and held.result.json()["meta_info"]["completion_tokens"] == 2


# ---------------------------------------------------------------------------------------------- status
def test_info_endpoints(http):
    info = http.get("/get_model_info").json()
    assert info["is_generation"] is True and info["weight_version"] == "default"
    assert info["context_length"] == 512 and info["vocab_size"] == 49152
    a, b = http.get("/get_server_info").json(), http.get("/server_info").json()
    assert a.keys() == b.keys() and a["port"] == b["port"]
    assert a["api_key"] is None and a["engine_config"]["dtype"] == "float32"
    assert a["max_total_num_tokens"] > 0 and "internal_states" in a
    assert http.get("/get_weight_version").json() == {"weight_version": "default"}
    load = http.get("/get_load").json()
    assert load[0]["dp_rank"] == 0 and load[0]["num_reqs"] == 0
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 512


def test_metrics_are_prometheus_text(http):
    _generate(http, {"input_ids": IDS, "sampling_params": {"max_new_tokens": 2}})
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for line in r.text.strip().splitlines():
        assert line.startswith("# ") or re.fullmatch(r"tlt:[a-z0-9_]+\{[^}]*\} -?[0-9.e+-]+",
                                                     line), line
    assert _metric(http, "generation_tokens_total") >= 2
    assert _metric(http, "kv_capacity_tokens") > 0 and _metric(http, "num_running_reqs") == 0
    assert re.search(r'^tlt:http_requests_total\{.*path="/generate",status="200"\} [1-9]', r.text, re.M)
