"""A distributed weight update driven the way a trainer drives SGLang: this test process is rank 0 of a gloo
group with the server (rank 1), sends each bucket's names, dtypes and shapes over HTTP and broadcasts the
tensors. The result equals a disk update of the same weights; a bad bucket is refused, weights unchanged."""

from __future__ import annotations

import shutil
import threading
from datetime import timedelta

import httpx
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from server_proc import free_port, launch
from tiny_models import make_tiny_checkpoint

IDS = [[504, 3458, 314, 253, 1345], [7, 8, 9]]
GREEDY = {"max_new_tokens": 8, "temperature": 0}
GROUP = "slime-pp_0"


def init_process_group(backend, init_method, world_size, rank, group_name, timeout):
    """The trainer's side, as verl / slime write it (slime/utils/distributed_utils.py, a copy of SGLang's
    `init_custom_process_group`): a group of its own, keys prefixed by its name, the default group untouched."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class _Post(threading.Thread):
    """An HTTP call that waits for this process's collective to happen (as the trainer's Ray .remote())."""

    def __init__(self, url: str, path: str, payload: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.payload, self.response = url, path, payload, None
        self.start()

    def run(self):
        self.response = httpx.post(self.url + self.path, json=self.payload, timeout=120, trust_env=False)

    def result(self) -> httpx.Response:
        self.join(120)
        assert self.response is not None, "the server did not answer"
        return self.response


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_llama, smol_tokenizer_dir):
    root = tmp_path_factory.mktemp("dist_root")
    a = shutil.copytree(tiny_llama, root / "a")
    b = make_tiny_checkpoint(root / "b", "llama", smol_tokenizer_dir, seed=1)
    return {"root": str(root), "a": str(a), "b": b}


@pytest.fixture(scope="module")
def server(tiny_llama, ckpts, tmp_path_factory):
    s = launch(tiny_llama, tmp_path_factory.mktemp("dist"), "--weight-roots", ckpts["root"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def group(server):
    """The weight-update group, joined as slime's connect_rollout_engines_from_distributed does."""
    port = free_port()
    join = _Post(server.url, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
        "group_name": GROUP, "backend": "gloo"})
    pg = init_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, GROUP, timeout=timedelta(seconds=60))
    r = join.result()
    assert r.status_code == 200 and r.json()["success"], r.text
    yield pg
    r = httpx.post(server.url + "/destroy_weights_update_group", json={"group_name": GROUP}, trust_env=False)
    assert r.status_code == 200 and r.json()["success"], r.text
    dist.destroy_process_group(pg)


def broadcast_bucket(server, pg, named: list[tuple[str, torch.Tensor]], **fields) -> httpx.Response:
    """slime's update_weights_from_distributed: metadata over HTTP, then one broadcast per tensor from rank 0."""
    post = _Post(server.url, "/update_weights_from_distributed", {
        "names": [n for n, _ in named],
        "dtypes": [str(t.dtype).replace("torch.", "") for _, t in named],
        "shapes": [list(t.shape) for _, t in named],
        "group_name": GROUP, "flush_cache": False, **fields})
    handles = [dist.broadcast(t, 0, group=pg, async_op=True) for _, t in named]
    for h in handles:
        h.wait()
    return post.result()


def _outputs(http) -> list[list[int]]:
    r = http.post("/generate", json={"input_ids": IDS, "sampling_params": GREEDY})
    assert r.status_code == 200, r.text
    return [o["output_ids"] for o in r.json()]


def _checksum(http) -> str:
    return http.get("/get_weights_checksum").json()["checksum"]


def test_distributed_update_equals_disk_update(server, group, ckpts):
    with server.client() as http:
        original, before = _checksum(http), _outputs(http)
        items = list(load_file(f"{ckpts['b']}/model.safetensors").items())
        half = len(items) // 2
        for bucket in (items[:half], items[half:]):  # slime sends buckets of --update-weight-buffer-size
            r = broadcast_bucket(server, group, bucket, weight_version="b-dist")
            assert r.status_code == 200 and r.json()["success"], r.text
        assert http.get("/get_weight_version").json()["weight_version"] == "b-dist"
        distributed, after = _checksum(http), _outputs(http)
        assert after != before and distributed != original

        assert http.post("/update_weights_from_disk", json={"model_path": ckpts["a"]}).status_code == 200
        assert _checksum(http) == original and _outputs(http) == before
        assert http.post("/update_weights_from_disk", json={"model_path": ckpts["b"]}).status_code == 200
        assert _checksum(http) == distributed and _outputs(http) == after
        http.post("/update_weights_from_disk", json={"model_path": ckpts["a"], "weight_version": "default"})


def test_bucket_in_another_dtype_is_cast(server, group, ckpts):
    """Trainers often broadcast bf16 to a server of another dtype: received as sent, cast on staging."""
    name = "model.norm.weight"
    with server.client() as http:
        original = _checksum(http)
        new = torch.full((64,), 0.5, dtype=torch.bfloat16)
        assert broadcast_bucket(server, group, [(name, new)]).status_code == 200
        got = http.post("/get_weights_by_name", json={"name": name, "truncate_size": 4}).json()
        assert got == [0.5] * 4
        old = load_file(f"{ckpts['a']}/model.safetensors")[name]
        assert broadcast_bucket(server, group, [(name, old)]).status_code == 200
        assert _checksum(http) == original


@pytest.mark.parametrize("fault", ["mismatched shape", "unknown name", "integer dtype"])
def test_bad_bucket_is_refused_and_changes_nothing(server, group, ckpts, fault):
    """The server still takes part in every broadcast (the trainer never hangs), then refuses it whole."""
    items = list(load_file(f"{ckpts['b']}/model.safetensors").items())[:4]
    name, t = items[-1]
    if fault == "mismatched shape":
        items[-1] = (name, t.flatten()[:-1].clone())
    elif fault == "unknown name":
        items[-1] = ("model.layers.9.mlp.up_proj.weight", t)
    else:
        items[-1] = (name, t.to(torch.int32))
    with server.client() as http:
        before, out, version = _checksum(http), _outputs(http), http.get("/get_weight_version").json()
        r = broadcast_bucket(server, group, items, weight_version="never")
        assert r.status_code == 400 and r.json()["success"] is False, r.text
        assert "weights unchanged" in r.json()["message"]
        assert _checksum(http) == before and _outputs(http) == out
        assert http.get("/get_weight_version").json() == version


def test_group_errors(server, group):
    with server.client() as http:
        r = http.post("/update_weights_from_distributed", json={
            "names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]], "group_name": "nope"})
        assert r.status_code == 400 and "no weight update group" in r.json()["message"]
        r = http.post("/update_weights_from_distributed", json={
            "names": ["model.norm.weight"], "dtypes": ["float33"], "shapes": [[64]], "group_name": GROUP})
        assert r.status_code == 400 and "unknown dtype" in r.json()["message"]
        r = http.post("/init_weights_update_group", json={
            "master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2,
            "group_name": GROUP, "backend": "gloo"})
        assert r.status_code == 400 and "exists already" in r.json()["message"]
        r = http.post("/init_weights_update_group", json={
            "master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2,
            "group_name": "other", "backend": "nccl"})
        assert r.status_code == 400 and "CUDA" in r.json()["message"]
        r = http.post("/destroy_weights_update_group", json={"group_name": "nope"})
        assert r.status_code == 400 and r.json()["success"] is False


def test_release_update_resume_round_trip(server, group, ckpts):
    """A colocated trainer's step (slime's offload / onload): release all, train, resume the weights, push
    new ones, resume the KV cache. Meanwhile generation gets a clear 503; afterwards outputs are as usual."""
    with server.client() as http:
        before = _outputs(http)
        r = http.post("/release_memory_occupation", json={})  # slime sends no tags: everything
        assert r.status_code == 200 and r.json()["released"] == ["kv_cache", "weights"], r.text
        r = http.post("/generate", json={"input_ids": IDS[0], "sampling_params": GREEDY})
        assert r.status_code == 503 and "released" in r.json()["error"]["message"]
        assert http.get("/health_generate").status_code == 503
        assert http.get("/get_weights_checksum").status_code == 503
        r = http.post("/release_memory_occupation", json={"tags": ["activations"]})
        assert r.status_code == 400 and "unknown memory tag" in r.json()["error"]["message"]

        assert http.post("/resume_memory_occupation", json={"tags": ["weights"]}).json()["released"] == ["kv_cache"]
        items = list(load_file(f"{ckpts['b']}/model.safetensors").items())
        assert broadcast_bucket(server, group, items, weight_version="b-colocated").status_code == 200
        assert http.post("/generate", json={"input_ids": IDS[0], "sampling_params": GREEDY}).status_code == 503
        r = http.post("/resume_memory_occupation", json={"tags": ["kv_cache", "cuda_graph"]})
        assert r.status_code == 200 and r.json()["released"] == []
        assert _outputs(http) != before
        http.post("/update_weights_from_disk", json={"model_path": ckpts["a"], "weight_version": "default"})
        assert _outputs(http) == before


def test_server_keeps_serving_while_it_waits_for_the_broadcast(server, group, ckpts):
    """The receive waits in a worker thread: until the trainer broadcasts, the event loop still generates."""
    name = "model.norm.weight"
    same = load_file(f"{ckpts['a']}/model.safetensors")[name]
    post = _Post(server.url, "/update_weights_from_distributed", {
        "names": [name], "dtypes": ["float32"], "shapes": [[64]], "group_name": GROUP})
    with server.client() as http:
        before = _checksum(http)
        for _ in range(2):
            assert len(_outputs(http)[0]) == GREEDY["max_new_tokens"]
        assert post.is_alive()  # still waiting for rank 0
        dist.broadcast(same, 0, group=group)
        assert post.result().status_code == 200
        assert _checksum(http) == before
