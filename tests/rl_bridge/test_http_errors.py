"""Bad input and security over real HTTP: every bad request gets a 4xx with a JSON message, changes nothing,
and the next valid request is served. The server here runs the way it must off loopback: with an API key,
weight roots and a (small) body limit."""

from __future__ import annotations

import base64
import os
import pickle

import httpx
import pytest
from server_proc import launch

from tlt.rl_bridge.http_server import build_parser, exposure_error, main

KEY = "test-key-7f3a"
LIMIT = 1 << 20
IDS = [504, 3458, 314, 253]
OK_GENERATE = ("POST", "/generate", {"json": {"input_ids": IDS, "sampling_params": {"max_new_tokens": 1}}})


@pytest.fixture(scope="module")
def roots(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("weight_root")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "config.json").write_text("{}")
    os.symlink(outside, root / "link_out")  # inside the root by name, outside by its real path
    return {"root": str(root), "outside": str(outside), "model": tiny_llama}


@pytest.fixture(scope="module")
def server(tiny_llama, roots, tmp_path_factory):
    s = launch(tiny_llama, tmp_path_factory.mktemp("errors"), "--weight-roots", roots["root"],
               "--max-request-bytes", str(LIMIT), "--max-weights-request-bytes", str(LIMIT), api_key=KEY)
    yield s
    s.stop()


@pytest.fixture
def http(server):
    with server.client() as c:
        yield c


def _json(body) -> dict:
    content = body if isinstance(body, bytes) else body.encode()
    return {"content": content, "headers": {"Content-Type": "application/json"}}


def _gen(**fields) -> tuple:
    body = {"input_ids": IDS, "sampling_params": {"max_new_tokens": 2}}
    body.update(fields)
    return ("POST", "/generate", {"json": body})


def _sp(**params) -> tuple:
    return _gen(sampling_params={"max_new_tokens": 2, **params})


BAD = {
    # malformed or mistyped bodies
    "malformed JSON": (400, ("POST", "/generate", _json('{"input_ids": [1, 2'))),
    "not an object": (400, ("POST", "/generate", _json("[1, 2, 3]"))),
    "empty body": (400, ("POST", "/generate", _json(b""))),
    "text not a string": (400, ("POST", "/generate", {"json": {"text": 5}})),
    "input_ids with a string": (400, _gen(input_ids=[1, "a"])),
    "input_ids with a bool": (400, _gen(input_ids=[1, True])),
    "return_logprob not a bool": (400, _gen(return_logprob="yes")),
    "sampling_params not an object": (400, _gen(sampling_params="greedy")),
    "max_new_tokens a string": (400, _sp(max_new_tokens="ten")),
    # missing or contradictory fields
    "no prompt": (400, ("POST", "/generate", {"json": {"sampling_params": {}}})),
    "text and input_ids": (400, _gen(text="hi")),
    "abort without rid": (400, ("POST", "/abort_request", {"json": {}})),
    "weights without model_path": (400, ("POST", "/update_weights_from_disk", {"json": {}})),
    "unknown field": (400, _gen(temprature=0.5)),
    "unknown sampling param": (400, _sp(temprature=0.5)),
    # values out of range
    "out-of-vocab id": (400, _gen(input_ids=[1, 10**9])),
    "negative id": (400, _gen(input_ids=[-1])),
    "empty input_ids": (400, _gen(input_ids=[])),
    "empty text": (400, ("POST", "/generate", {"json": {"text": ""}})),
    "prompt longer than the context": (400, _gen(input_ids=[5] * 600)),
    "negative max_new_tokens": (400, _sp(max_new_tokens=-1)),
    "temperature < 0": (400, _sp(temperature=-0.5)),
    "top_p = 0": (400, _sp(top_p=0)),
    "n = 0": (400, _sp(n=0)),
    "logprob_start_len past the prompt": (400, _gen(return_logprob=True, logprob_start_len=len(IDS))),
    "negative top_logprobs_num": (400, _gen(return_logprob=True, top_logprobs_num=-1)),
    "stream with n > 1": (400, _gen(stream=True, sampling_params={"n": 2})),
    "per-item flags that differ": (400, ("POST", "/generate", {"json": {
        "input_ids": [IDS, IDS], "return_logprob": [True, False]}})),
    # features tlt does not have, sent non-empty
    "image_data": (400, _gen(image_data=["http://example.com/cat.png"])),
    "lora_path": (400, _gen(lora_path="my-adapter")),
    "regex": (400, _sp(regex="[a-z]+")),
    "pause mode": (400, ("POST", "/pause_generation", {"json": {"mode": "sleep"}})),
    # OpenAI routes
    "chat without messages": (400, ("POST", "/v1/chat/completions", {"json": {"model": "m",
                                                                             "messages": []}})),
    "chat with a bad role": (400, ("POST", "/v1/chat/completions", {"json": {
        "model": "m", "messages": [{"role": "robot", "content": "hi"}]}})),
    "completion temperature < 0": (400, ("POST", "/v1/completions", {"json": {
        "model": "m", "prompt": "hi", "temperature": -1}})),
    # routing
    "unknown endpoint": (404, ("POST", "/generate_everything", {"json": {}})),
    "wrong method": (405, ("GET", "/generate", {})),
    # size
    "oversized body": (413, ("POST", "/generate", _json(b'{"text": "' + b"a" * (LIMIT + 10) + b'"}'))),
    # weights
    "weights path outside the roots": (403, "outside_path"),
    "weights path escaping by symlink": (403, "symlink_path"),
    "weights path inside the roots but missing": (400, "missing_path"),
    "weights from a pickle body": (400, ("POST", "/update_weights_from_tensor", {
        "content": pickle.dumps({"model.embed_tokens.weight": [1.0]}),
        "headers": {"Content-Type": "application/octet-stream"}})),
    "weights as base64 of garbage": (400, ("POST", "/update_weights_from_tensor", {"json": {
        "serialized_named_tensors": [base64.b64encode(b"\x80\x04not safetensors").decode()]}})),
    "weights not base64": (400, ("POST", "/update_weights_from_tensor", {"json": {
        "serialized_named_tensors": ["%%%"]}})),
    "weights with an unknown load_format": (400, ("POST", "/update_weights_from_tensor", {"json": {
        "serialized_named_tensors": [], "load_format": "flattened_bucket"}})),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_refused_and_the_server_keeps_serving(server, http, roots, case):
    status, request = BAD[case]
    if isinstance(request, str):  # weight paths depend on the fixture
        path = {"outside_path": roots["model"], "symlink_path": os.path.join(roots["root"], "link_out"),
                "missing_path": os.path.join(roots["root"], "nope")}[request]
        request = ("POST", "/update_weights_from_disk", {"json": {"model_path": path}})
    method, url, kw = request
    before = http.get("/get_weight_version").json()
    r = http.request(method, url, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    assert KEY not in r.text
    assert http.get("/get_weight_version").json() == before  # nothing changed
    method, url, kw = OK_GENERATE
    ok = http.request(method, url, **kw)
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 1


def test_messages_name_the_fault(http):
    msg = lambda **kw: http.post("/generate", **kw).json()["error"]["message"]  # noqa: E731
    assert "malformed JSON" in msg(**_json("{oops"))
    assert "temprature" in msg(json={"input_ids": IDS, "temprature": 1})
    assert "outside the vocabulary" in msg(json={"input_ids": [10**9]})
    assert "temperature" in msg(json={"input_ids": IDS, "sampling_params": {"temperature": -1}})
    assert "image_data" in msg(json={"input_ids": IDS, "image_data": ["x"]})
    r = http.post("/update_weights_from_tensor", content=b"\x80\x04junk",
                  headers={"Content-Type": "application/octet-stream"})
    assert "safetensors" in r.json()["error"]["message"] and r.json()["success"] is False


def test_clients_send_empty_unsupported_fields(http):
    # what SGLang clients send by default: accepted
    r = http.post("/generate", json={
        "input_ids": IDS, "image_data": None, "lora_path": None, "video_data": [],
        "custom_logit_processor": None,
        "return_hidden_states": False, "data_parallel_rank": None,
        "sampling_params": {"max_new_tokens": 2, "frequency_penalty": 0.0, "top_k": 100000000, "regex": None,
                            "json_schema": None, "stop": None}})
    assert r.status_code == 200, r.text


def test_api_key(server):
    url = server.url
    assert httpx.get(url + "/health").status_code == 200  # the only open endpoint
    wrong = ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"})
    for headers in wrong:
        r = httpx.post(url + "/generate", json=OK_GENERATE[2]["json"], headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert httpx.get(url + "/metrics", headers=headers).status_code == 401
        assert httpx.get(url + "/get_model_info", headers=headers).status_code == 401
    r = httpx.post(url + "/generate", json=OK_GENERATE[2]["json"], headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    info = httpx.get(url + "/get_server_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["api_key"] == "<set>" and KEY not in str(info)


def test_oversized_body_without_content_length(server):
    def chunks():
        for _ in range(20):
            yield b"x" * (LIMIT // 10)

    r = httpx.post(server.url + "/generate", content=chunks(), headers={**server.headers,
                                                                          "Content-Type": "application/json"})
    assert r.status_code == 413


def test_refuses_to_start_exposed(tmp_path, capsys):
    parse = build_parser().parse_args
    assert "--api-key" in exposure_error(parse(["--host", "0.0.0.0"]))
    assert "--weight-roots" in exposure_error(parse(["--host", "0.0.0.0", "--api-key", "k"]))
    exposed = ["--host", "0.0.0.0", "--api-key", "k", "--weight-roots", str(tmp_path)]
    assert exposure_error(parse(exposed)) is None
    assert exposure_error(parse(["--host", "::1"])) is None and exposure_error(parse([])) is None
    assert "not a directory" in exposure_error(parse(["--weight-roots", str(tmp_path / "missing")]))
    assert main(["--host", "0.0.0.0", "--port", "1"]) == 2  # refused before any model is loaded
    assert "--api-key" in capsys.readouterr().err


def test_deterministic_inference_flag_reaches_the_engine_arguments():
    args = build_parser().parse_args(["--enable-deterministic-inference"])
    assert args.enable_deterministic_inference is True
    assert build_parser().parse_args([]).enable_deterministic_inference is False
