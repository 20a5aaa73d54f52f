"""Ray scale-out on a local cluster: two rollout workers (speculative, with a drafter) give one engine's greedy
outputs, take weight and drafter updates together, refuse a bad one everywhere, and name a worker that fails.

Skipped when ray is not installed (`pip install -e '.[ray]'`). Two CPUs for the cluster, one per worker, one
torch thread in each: the box has two cores.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")

from tiny_models import make_tiny_checkpoint  # noqa: E402

from tlt.rl_bridge.ray_workers import BroadcastError, RolloutCoordinator, RolloutWorker  # noqa: E402

PROMPTS = [[504, 3458, 314, 253, 1345], [7, 8, 9], [1000, 2000, 3000, 4000], [42, 43], [300, 301, 302, 303]]
GREEDY = {"max_new_tokens": 8, "temperature": 0}
ENGINE = dict(dtype="float32", random_seed=0, kv_cache_bytes=64 << 20, torch_num_threads=1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_llama, smol_tokenizer_dir):
    """The served model (a), another seed (b), and two random drafters for them."""
    import tlt
    from tlt.engine.spec.drafter import EagleDrafter

    root = tmp_path_factory.mktemp("ray")
    b = make_tiny_checkpoint(root / "b", "llama", smol_tokenizer_dir, seed=1)
    threads = torch.get_num_threads()
    refs = {}
    try:
        for name, path in (("a", tiny_llama), ("b", b)):
            eng = tlt.Engine(path, **ENGINE)
            refs[name] = [o["output_ids"] for o in eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
            if name == "a":
                model_config = eng.model_config
                for seed in (1, 2):
                    EagleDrafter.random(eng.model_config, seed=seed, draft_vocab_size=4096).save(str(root / f"d{seed}"))
            eng.shutdown()
    finally:
        torch.set_num_threads(threads)
    assert refs["a"] != refs["b"]
    return {"a": tiny_llama, "b": b, "d1": str(root / "d1"), "d2": str(root / "d2"), "reference": refs,
            "model_config": model_config}


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def coord(cluster, ckpts):
    c = RolloutCoordinator.create(2, ckpts["a"], num_cpus=1, speculative_draft_model_path=ckpts["d1"], **ENGINE)
    yield c
    c.shutdown()


def _ids(coord) -> list[list[int]]:
    return [o["output_ids"] for o in coord.generate(PROMPTS, GREEDY)]


def test_rollout_over_both_workers_equals_one_engine(coord, ckpts):
    before = [s["finished_requests"] for s in coord.stats()]
    idle_calls = []

    def on_idle(i, worker):
        idle_calls.append((i, coord.idle_workers()))

    outs = coord.generate(PROMPTS, GREEDY, on_idle=on_idle, return_logprob=True)
    assert [o["output_ids"] for o in outs] == ckpts["reference"]["a"]
    assert all([x[1] for x in o["meta_info"]["output_token_logprobs"]] == o["output_ids"] for o in outs)
    stats = coord.stats()
    done = [s["finished_requests"] - b for s, b in zip(stats, before)]
    assert done == [3, 2]  # contiguous shares, sizes differing by at most one
    assert all(s["spec_verify_rounds"] > 0 for s in stats)  # both workers speculated
    # The first worker to finish is reported idle (once) while the other still runs its share.
    assert len(idle_calls) == 1
    i, idle = idle_calls[0]
    assert idle == [i]
    assert coord.idle_workers() == [0, 1]
    assert coord.generate([], GREEDY) == []


def test_weight_update_reaches_every_worker(coord, ckpts):
    original = coord.weights_checksums()
    assert original[0] == original[1]
    assert coord.update_weights(load_file(f"{ckpts['b']}/model.safetensors"), weight_version="b-1") == "b-1"
    assert [s["weight_version"] for s in coord.stats()] == ["b-1", "b-1"]
    sums = coord.weights_checksums()
    assert sums[0] == sums[1] != original[0]
    assert _ids(coord) == ckpts["reference"]["b"]
    coord.update_weights(load_file(f"{ckpts['a']}/model.safetensors"), weight_version="a-2")
    assert coord.weights_checksums() == original
    assert _ids(coord) == ckpts["reference"]["a"]


@pytest.mark.parametrize("fault", ["NaN", "wrong shape"])
def test_bad_weight_update_is_refused_everywhere(coord, ckpts, fault):
    weights = load_file(f"{ckpts['b']}/model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    if fault == "NaN":
        weights[name][0, 0] = float("nan")
    else:
        weights[name] = weights[name].t().contiguous()
    sums, versions = coord.weights_checksums(), [s["weight_version"] for s in coord.stats()]
    with pytest.raises(BroadcastError, match="rejected by every worker") as e:
        coord.update_weights(weights, weight_version="never")
    assert e.value.succeeded == [] and sorted(e.value.failed) == [0, 1]
    assert name in e.value.failed[0]
    assert coord.weights_checksums() == sums
    assert [s["weight_version"] for s in coord.stats()] == versions
    assert _ids(coord) == ckpts["reference"]["a"]


def test_drafter_versions_reach_every_worker(coord, ckpts):
    from tlt.engine.spec.drafter import EagleDrafter

    assert len({s["drafter_version"] for s in coord.stats()}) == 1
    d2 = EagleDrafter.load(ckpts["d2"], ckpts["model_config"])
    assert coord.update_drafter(d2, version="v2") == "v2"
    assert [s["drafter_version"] for s in coord.stats()] == ["v2", "v2"]
    assert _ids(coord) == ckpts["reference"]["a"]  # speculation is lossless, whatever the drafter
    with torch.no_grad():
        next(d2.parameters()).fill_(float("nan"))
    with pytest.raises(BroadcastError, match="rejected by every worker"):
        coord.update_drafter(d2, version="v3")
    assert [s["drafter_version"] for s in coord.stats()] == ["v2", "v2"]


def test_a_failed_worker_is_named(coord, ckpts):
    # A worker whose engine never loaded (its actor is dead): the update reaches worker 0 and names worker 1.
    broken = ray.remote(num_cpus=0)(RolloutWorker).remote(ckpts["a"] + "/missing", **ENGINE)
    pair = RolloutCoordinator([coord.workers[0], broken])
    try:
        with pytest.raises(BroadcastError, match=r"failed on workers \[1\]") as e:
            pair.update_weights(load_file(f"{ckpts['b']}/model.safetensors"), weight_version="b-3")
        assert e.value.succeeded == [0]
        assert [s["weight_version"] for s in coord.stats()] == ["b-3", "a-2"]
    finally:
        ray.kill(broken)
    coord.update_weights(load_file(f"{ckpts['a']}/model.safetensors"), weight_version="a-4")
    assert len(set(coord.weights_checksums())) == 1

