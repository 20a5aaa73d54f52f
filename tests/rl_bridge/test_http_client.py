"""HttpClient and atomic weight updates over HTTP: a bad update changes nothing (checksum, outputs, version);
a good one gives the outputs of a fresh engine on the new weights."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file
from server_proc import launch, wait_for

from tlt.rl_bridge.client import HttpClient, TltHttpError
from tlt.rl_bridge.tensor_codec import decode_named_tensors, encode_b64, encode_named_tensors

PROMPTS = [[504, 3458, 314, 253, 1345], [7, 8, 9], [1000, 2000, 3000, 4000]]
GREEDY = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_llama, smol_tokenizer_dir):
    """Inside the weight root: a copy of the served model (a), another seed (b), a smaller model (small)."""
    from tests.conftest import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("client_root")
    a = shutil.copytree(tiny_llama, root / "a")
    b = make_tiny_checkpoint(root / "b", "llama", smol_tokenizer_dir, seed=1)
    small = make_tiny_checkpoint(root / "small", "llama", smol_tokenizer_dir, seed=2, num_hidden_layers=1)
    return {"root": str(root), "a": str(a), "b": b, "small": small}


@pytest.fixture(scope="module")
def server(tiny_llama, ckpts, tmp_path_factory):
    s = launch(tiny_llama, tmp_path_factory.mktemp("client"), "--weight-roots", ckpts["root"], api_key="k")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with HttpClient(server.url, api_key="k") as c:
        yield c


@pytest.fixture(scope="module")
def reference(ckpts):
    """Greedy outputs of fresh in-process engines on a and b (one torch thread, as the server)."""
    import tlt

    threads = torch.get_num_threads()
    out = {}
    try:
        for name in ("a", "b"):
            eng = tlt.Engine(ckpts[name], dtype="float32", random_seed=0, kv_cache_bytes=64 << 20,
                             torch_num_threads=1)
            out[name] = [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
            eng.shutdown()
    finally:
        torch.set_num_threads(threads)
    assert out["a"] != out["b"]
    return out


def _outputs(client) -> list[list[int]]:
    return [o["output_ids"] for o in client.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def _checksum(server) -> str:
    with server.client() as c:
        return c.get("/get_weights_checksum").json()["checksum"]


def test_three_lines(client, reference):
    out = client.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, return_logprob=True)
    assert out["output_ids"] == reference["a"][0]
    assert [x[1] for x in out["meta_info"]["output_token_logprobs"]] == out["output_ids"]
    info = client.get_model_info()
    assert info["weight_version"] == "default" and info["model_type"] == "llama"
    streamed = list(client.stream_generate(input_ids=PROMPTS[1], sampling_params=GREEDY))
    assert streamed[-1]["output_ids"] == reference["a"][1] and len(streamed) == 8


def test_codec_roundtrip_keeps_names_dtypes_and_values():
    t = {"x": torch.randn(3, 4, dtype=torch.bfloat16), "y": torch.arange(5, dtype=torch.float32)}
    t["z"] = t["y"]  # shared memory (tied weights): sent as two tensors, not refused
    back = dict(decode_named_tensors(encode_named_tensors(t)))
    assert back.keys() == t.keys() and back["x"].dtype == torch.bfloat16
    assert all(torch.equal(back[k], t[k]) for k in t)


@pytest.mark.parametrize("fault", ["wrong shape", "NaN", "unknown name", "integer dtype"])
def test_update_with_one_wrong_tensor_changes_nothing(server, client, ckpts, reference, fault):
    weights = load_file(f"{ckpts['b']}/model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    if fault == "wrong shape":
        weights[name] = weights[name].t().contiguous()
    elif fault == "NaN":
        weights[name] = weights[name].clone()
        weights[name][0, 0] = float("nan")
    elif fault == "unknown name":
        weights["model.layers.9.mlp.down_proj.weight"] = weights[name]
    else:
        weights[name] = weights[name].to(torch.int32)
    before = _checksum(server)
    version = client.get_weight_version()
    with pytest.raises(TltHttpError) as e:
        client.update_weights_from_tensor(weights, weight_version="never")
    assert e.value.status == 400 and e.value.body["success"] is False
    assert _checksum(server) == before
    assert client.get_weight_version() == version
    assert _outputs(client) == reference["a"]


def test_disk_update_of_a_different_architecture_changes_nothing(server, client, ckpts, reference):
    before = _checksum(server)
    with pytest.raises(TltHttpError, match="architecture") as e:
        client.update_weights_from_disk(ckpts["small"], weight_version="never")
    assert e.value.status == 400
    assert _checksum(server) == before and client.get_weight_version() == "default"
    assert _outputs(client) == reference["a"]


def test_good_updates_give_the_new_weights_outputs(server, client, ckpts, reference):
    original = _checksum(server)
    # tensors, as one raw safetensors body
    r = client.update_weights_from_tensor(load_file(f"{ckpts['b']}/model.safetensors"), weight_version="b-1")
    assert r["success"] and r["weight_version"] == "b-1"
    assert _outputs(client) == reference["b"]
    meta = client.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["meta_info"]
    assert meta["weight_version"] == "b-1"
    assert _checksum(server) != original

    # from disk, with AReaL's payload (areal/engine/sglang_remote.py, build_disk_weight_update_requests)
    with server.client() as http:
        r = http.post("/update_weights_from_disk", json={"model_path": ckpts["a"], "abort_all_requests": True,
                                                          "weight_version": "a-2"})
    assert r.status_code == 200 and r.json()["success"], r.text
    assert _outputs(client) == reference["a"] and _checksum(server) == original
    assert client.get_weight_version() == "a-2"

    # tensors in SGLang's JSON form: base64 safetensors entries, merged into one atomic update
    items = list(load_file(f"{ckpts['b']}/model.safetensors").items())
    half = len(items) // 2
    payload = {"serialized_named_tensors": [encode_b64(items[:half]), encode_b64(items[half:])],
               "load_format": None, "flush_cache": True, "weight_version": "b-3"}
    with server.client() as http:
        overlapping = [encode_b64(items[:2]), encode_b64(items[1:3])]
        dup = http.post("/update_weights_from_tensor",
                        json={**payload, "serialized_named_tensors": overlapping})
        assert dup.status_code == 400 and "more than one" in dup.json()["message"]
        assert client.get_weight_version() == "a-2"
        r = http.post("/update_weights_from_tensor", json=payload)
    assert r.status_code == 200, r.text
    assert _outputs(client) == reference["b"] and client.get_weight_version() == "b-3"
    client.update_weights_from_disk(ckpts["a"], weight_version="a-4")
    assert _outputs(client) == reference["a"]


def test_update_while_paused_in_place(server, client, ckpts):
    """Pause keeps a request in flight; the update lands between two steps; continue finishes it."""
    chunks: list[dict] = []

    def consume():
        for out in client.stream_generate(input_ids=PROMPTS[0],
                                          sampling_params={"max_new_tokens": 500, "ignore_eos": True}):
            chunks.append(out)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    wait_for(lambda: len(chunks) >= 2 or not t.is_alive(), what="the stream to start")
    client.pause_generation()  # in_place: the request keeps its place and its KV
    client.update_weights_from_tensor(load_file(f"{ckpts['b']}/model.safetensors"), weight_version="b-5")
    assert t.is_alive()
    client.continue_generation()
    t.join(60)
    last = chunks[-1]["meta_info"]
    assert last["finish_reason"]["type"] == "length" and last["completion_tokens"] == 500
    assert last["weight_version"] == "b-5"
    client.update_weights_from_disk(ckpts["a"], weight_version="a-6")


def test_client_errors_and_control(server, client):
    with pytest.raises(TltHttpError) as e:
        client.generate(input_ids=[10**9], sampling_params={"max_new_tokens": 1})
    assert e.value.status == 400 and "vocabulary" in e.value.message
    with pytest.raises(TltHttpError) as e:
        HttpClient(server.url, api_key="wrong").get_model_info()
    assert e.value.status == 401
    assert client.abort_request(abort_all=True)["success"]
    assert client.flush_cache() is True
    assert client.health() and client.get_server_info()["api_key"] == "<set>"
    assert client.get_weights_by_name("model.norm.weight", truncate_size=4) != []
