"""tlt's own endpoints over HTTP: drafter hot-swap, speculation mode, the round log; `tlt serve --drafter`."""

from __future__ import annotations

import pytest
from server_proc import launch

IDS = [504, 3458, 314, 253, 1345, 30, 216]


@pytest.fixture(scope="module")
def drafter_root(tiny_llama, tmp_path_factory):
    import tlt
    from tlt.engine.spec.drafter import EagleDrafter

    root = tmp_path_factory.mktemp("drafters")
    e = tlt.Engine(tiny_llama, dtype="float32")
    for seed in (1, 2):
        EagleDrafter.random(e.model_config, seed=seed, draft_vocab_size=4096).save(str(root / f"d{seed}"))
    e.shutdown()
    return root


@pytest.fixture(scope="module")
def server(tiny_llama, drafter_root, tmp_path_factory):
    s = launch(tiny_llama, tmp_path_factory.mktemp("drafter_srv"), "--drafter", str(drafter_root / "d1"),
               "--speculative-adaptive", "--speculative-arms", "s2k1n3,s3k1n4", "--weight-roots",
               str(drafter_root))
    yield s
    s.stop()


@pytest.fixture
def http(server):
    with server.client() as c:
        yield c


def _gen(http) -> dict:
    r = http.post("/generate", json={"input_ids": IDS, "sampling_params": {"max_new_tokens": 16, "temperature": 0,
                                                                           "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return r.json()


def test_speculation_mode_and_round_log(http):
    info = http.get("/get_model_info").json()
    assert info["drafter_version"] is not None
    r = http.post("/set_speculation", json={"mode": "s3k1n4"})
    assert r.status_code == 200 and r.json()["speculation"]["fixed_arm"] == "s3k1n4"
    http.get("/get_round_log", params={"clear": True})
    ref = _gen(http)
    rounds = http.get("/get_round_log", params={"clear": True}).json()["rounds"]
    assert rounds and {x["arm"] for x in rounds} == {"s3k1n4"}
    assert http.post("/set_speculation", json={"mode": "off"}).status_code == 200
    assert _gen(http)["output_ids"] == ref["output_ids"]  # plain decoding: the same tokens
    assert {x["arm"] for x in http.get("/get_round_log", params={"clear": True}).json()["rounds"]} == {"off"}
    bad = http.post("/set_speculation", json={"mode": "s99k1n2"})
    assert bad.status_code == 400
    assert http.post("/set_speculation", json={"mode": "adaptive"}).status_code == 200
    assert _gen(http)["output_ids"] == ref["output_ids"]


def test_update_drafter(http, drafter_root, tmp_path):
    ref = _gen(http)
    r = http.post("/update_drafter", json={"path": str(drafter_root / "d2"), "version": "v2"})
    assert r.status_code == 200 and r.json()["drafter_version"] == "v2", r.text
    out = _gen(http)
    assert out["meta_info"]["drafter_version"] == "v2" and out["output_ids"] == ref["output_ids"]
    outside = http.post("/update_drafter", json={"path": str(tmp_path), "version": "v3"})
    assert outside.status_code in (400, 403)
    alias = http.post("/update_drafter_from_disk", json={"path": str(drafter_root / "d1"), "version": "v2b"})
    assert alias.status_code == 200 and alias.json()["drafter_version"] == "v2b"
    status = http.get("/drafter/status").json()
    assert status["drafter_version"] == "v2b" and status["drafter_swaps"] == 2
    assert status["speculation"]["mode"] in ("adaptive", "fixed") and status["accept_length"] >= 1
    missing = http.post("/update_drafter", json={"path": str(drafter_root / "nope"), "version": "v3"})
    assert missing.status_code in (400, 404)
    assert http.get("/get_model_info").json()["drafter_version"] == "v2b"  # unchanged after refusals
    assert _gen(http)["output_ids"] == ref["output_ids"]


def test_metrics_by_arm(http):
    http.post("/set_speculation", json={"mode": "s2k1n3"})
    _gen(http)
    text = http.get("/metrics").text
    assert 'tlt:spec_rounds_total{' in text and 'arm="s2k1n3"' in text
    assert "tlt:spec_suspended{" in text
    line = next(x for x in text.splitlines() if x.startswith("tlt:spec_accept_length{"))
    assert float(line.split()[-1]) >= 1.0  # tokens per sequence per round: at least the target's own
    http.post("/set_speculation", json={"mode": "adaptive"})
