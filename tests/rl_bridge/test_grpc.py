"""The gRPC API (`tlt serve --grpc-port`) over a real server: the same outputs as HTTP, streaming, chunked
atomic weight updates, abort, model info, health, API key; and the committed generated code is current."""

from __future__ import annotations

import filecmp
import threading

import grpc
import pytest
import torch
from safetensors.torch import load_file
from server_proc import free_port, launch, num_requests, wait_for
from tiny_models import make_tiny_checkpoint

from tlt.rl_bridge.client import HttpClient
from tlt.rl_bridge.grpc_client import GrpcClient, TltGrpcError
from tlt.rl_bridge.proto import tlt_pb2 as pb
from tlt.rl_bridge.tensor_codec import encode_named_tensors

IDS = [504, 3458, 314, 253, 1345]
GREEDY = {"max_new_tokens": 8, "temperature": 0}
KEY = "k"


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    grpc_port = free_port()
    s = launch(tiny_llama, tmp_path_factory.mktemp("grpc"), "--grpc-port", str(grpc_port), api_key=KEY)
    s.grpc_target = f"127.0.0.1:{grpc_port}"
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with GrpcClient(server.grpc_target, api_key=KEY) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with HttpClient(server.url, api_key=KEY) as c:
        yield c


@pytest.fixture(scope="module")
def weights(tiny_llama, tmp_path_factory, smol_tokenizer_dir):
    """The served weights (a) and those of another seed (b)."""
    b = make_tiny_checkpoint(tmp_path_factory.mktemp("grpc_b"), "llama", smol_tokenizer_dir, seed=1)
    return {"a": load_file(f"{tiny_llama}/model.safetensors"), "b": load_file(f"{b}/model.safetensors")}


def _same(grpc_out: dict, http_out: dict) -> None:
    """Equal but for what differs between any two calls (request id, latency)."""
    for o in (grpc_out, http_out):
        o["meta_info"].pop("id")
        o["meta_info"].pop("e2e_latency")
    assert grpc_out == http_out


def _checksum(server) -> str:
    with server.client() as c:
        return c.get("/get_weights_checksum").json()["checksum"]


def test_generate_equals_http(client, http):
    kw = dict(input_ids=IDS, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0,
              top_logprobs_num=2, return_text_in_logprobs=True)
    _same(client.generate(**kw), http.generate(**kw))
    # a batch (concurrent calls), n = 2 per prompt, text prompts
    kw = dict(prompt=["Hello there", "One two three"], sampling_params={**GREEDY, "n": 2})
    outs = client.generate(**kw)
    assert len(outs) == 4
    for g, h in zip(outs, http.generate(**kw)):
        _same(g, h)


def test_stream(client):
    chunks = list(client.stream_generate(input_ids=IDS, sampling_params=GREEDY))
    assert [len(c["output_ids"]) for c in chunks] == list(range(1, 9))  # everything so far, one token a step
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    final = client.generate(input_ids=IDS, sampling_params=GREEDY)
    _same(chunks[-1], final)


def test_weight_update_in_chunks(server, client, weights):
    client.chunk_bytes = 64 << 10  # the tiny model is ~7 MB: a hundred chunks
    original, before = _checksum(server), client.generate(input_ids=IDS, sampling_params=GREEDY)
    r = client.update_weights_from_tensor(weights["b"], weight_version="b-1")
    assert r["success"] and r["weight_version"] == "b-1"
    after = client.generate(input_ids=IDS, sampling_params=GREEDY)
    assert after["output_ids"] != before["output_ids"] and after["meta_info"]["weight_version"] == "b-1"
    got = http_weight(server, "model.layers.0.mlp.up_proj.weight")
    assert got == weights["b"]["model.layers.0.mlp.up_proj.weight"].flatten()[:8].tolist()
    client.update_weights_from_tensor(weights["a"], weight_version="a-2")
    assert _checksum(server) == original
    assert client.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"] == before["output_ids"]


def http_weight(server, name: str) -> list[float]:
    with server.client() as c:
        return c.post("/get_weights_by_name", json={"name": name, "truncate_size": 1}).json()[0][:8]


def _bad_streams(weights) -> dict[str, list[pb.WeightsChunk]]:
    name = "model.layers.1.mlp.down_proj.weight"
    wrong_shape = dict(weights["b"], **{name: weights["b"][name].t().contiguous()})
    unknown = dict(weights["b"], **{"model.layers.7.mlp.down_proj.weight": weights["b"][name]})
    good = encode_named_tensors(weights["b"])
    half = len(good) // 2
    return {
        "wrong shape": [pb.WeightsChunk(data=encode_named_tensors(wrong_shape))],
        "unknown name": [pb.WeightsChunk(data=encode_named_tensors(unknown))],
        # the client says how much it sends: the cut is named as such
        "truncated": [pb.WeightsChunk(data=good[:1000], total_bytes=len(good)), pb.WeightsChunk(data=good[1000:half])],
        # nothing says how much: the safetensors parser refuses the cut buffer
        "truncated, no size": [pb.WeightsChunk(data=good[:half])],
        "not safetensors": [pb.WeightsChunk(data=b"\x80\x04pickle?" * 100)],
        "empty": [],
    }


@pytest.mark.parametrize("fault", ["wrong shape", "unknown name", "truncated", "truncated, no size",
                                   "not safetensors", "empty"])
def test_bad_chunk_stream_changes_nothing(server, client, weights, fault):
    before, version = _checksum(server), http_version(server)
    out = client.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"]
    chunks = _bad_streams(weights)[fault]
    if chunks:
        chunks[0].weight_version = "never"
    with pytest.raises(grpc.RpcError) as e:
        client._stub.UpdateWeights(iter(chunks), metadata=client._metadata, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert {"truncated": "cut short", "wrong shape": "shape", "unknown name": "unknown weight name",
            "truncated, no size": "safetensors", "not safetensors": "safetensors",
            "empty": "no chunks"}[fault] in e.value.details()
    assert _checksum(server) == before and http_version(server) == version
    assert client.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"] == out


def http_version(server) -> str:
    with server.client() as c:
        return c.get("/get_weight_version").json()["weight_version"]


def test_abort(server, client):
    long = {"max_new_tokens": 400, "ignore_eos": True}
    result: list[dict] = []
    t = threading.Thread(target=lambda: result.append(client.generate(input_ids=IDS, sampling_params=long,
                                                                       rid="grpc-abort")), daemon=True)
    t.start()
    with server.client() as http:
        wait_for(lambda: num_requests(http) == 1, what="the request to start")
        assert client.abort_request(rid="grpc-abort")["success"]
        t.join(30)
        meta = result[0]["meta_info"]
        assert meta["finish_reason"]["type"] == "abort" and meta["id"] == "grpc-abort"
        assert meta["completion_tokens"] < 400
        # leaving a stream aborts its request
        it = client.stream_generate(input_ids=IDS, sampling_params=long)
        next(it)
        it.close()
        wait_for(lambda: num_requests(http) == 0, what="the abandoned stream's request to be aborted")
    with pytest.raises(TltGrpcError) as e:
        client.abort_request()
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_model_info_health_stats_and_errors(server, client, tiny_llama):
    info = client.get_model_info()
    assert info["model_path"] == tiny_llama and info["vocab_size"] == 49152 and info["drafter_version"] is None
    assert info["dtype"] == "float32" and info["weight_version"] == http_version(server)
    assert client.health() and client.health(generate=True)
    assert client.get_stats()["finished_requests"] >= 1
    with pytest.raises(TltGrpcError) as e:
        client.generate(input_ids=[10**6], sampling_params=GREEDY)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in e.value.message
    with pytest.raises(TltGrpcError) as e:
        client.generate(input_ids=IDS, sampling_params={"temperature": -1})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.message
    with pytest.raises(TltGrpcError) as e:
        list(client.stream_generate(input_ids=IDS, sampling_params={**GREEDY, "n": 2}))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "n=1" in e.value.message


def test_api_key(server, weights):
    with GrpcClient(server.grpc_target) as anonymous, GrpcClient(server.grpc_target, api_key="wrong") as wrong:
        assert anonymous.health()  # open, as /health
        for c in (anonymous, wrong):
            with pytest.raises(TltGrpcError) as e:
                c.generate(input_ids=IDS, sampling_params=GREEDY)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(TltGrpcError) as e:
                c.update_weights_from_tensor({"model.norm.weight": torch.zeros(64)})
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(TltGrpcError) as e:
                list(c.stream_generate(input_ids=IDS, sampling_params=GREEDY))
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_generated_code_matches_the_proto(tmp_path):
    from pathlib import Path

    from grpc_tools import protoc

    root = Path(__file__).resolve().parents[2]
    proto = "tlt/rl_bridge/proto/tlt.proto"
    assert protoc.main(["protoc", f"-I{root}", f"-I{Path(protoc.__file__).parent / '_proto'}",
                        f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(root / proto)]) == 0
    for name in ("tlt_pb2.py", "tlt_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "tlt/rl_bridge/proto" / name, root / "tlt/rl_bridge/proto" / name,
                           shallow=False), f"{name} is stale: regenerate it (see tlt.proto)"


def test_sampling_params_message_has_every_engine_parameter():
    from dataclasses import fields

    from tlt.engine.sampling_params import SamplingParams

    assert set(pb.SamplingParams.DESCRIPTOR.fields_by_name) == {f.name for f in fields(SamplingParams)}

