"""Engine.release_memory_occupation / resume_memory_occupation: what is freed is really gone, generating
meanwhile is refused with a clear error, and outputs after resume equal those before. (The HTTP round trip,
in a trainer's release -> update -> resume order, is in test_http_distributed.py.)"""

from __future__ import annotations

import pytest
import torch

from tlt.engine.engine import EngineError
from tlt.engine.models.decoder import Linear, cpu_packing_supported

PROMPTS = [[504, 3458, 314, 253, 1345], [7, 8, 9]]
GREEDY = {"max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    """bf16 on CPU: the engine keeps oneDNN pre-packed weight copies, which a release frees."""
    import tlt

    threads = torch.get_num_threads()
    eng = tlt.Engine(tiny_llama, dtype="bfloat16", random_seed=0, kv_cache_bytes=64 << 20, torch_num_threads=1)
    yield eng
    eng.shutdown()
    torch.set_num_threads(threads)


def _packed(engine) -> list[bool]:
    return [m.packed is not None for m in engine.model.modules() if isinstance(m, Linear)] + [
        engine.model.head_packed is not None]


def _outputs(engine) -> list[list[int]]:
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def test_release_frees_and_resume_restores(engine):
    before = _outputs(engine)
    packed = _packed(engine)
    assert engine.kv.allocated_bytes() > 0
    assert all(packed) == cpu_packing_supported(torch.bfloat16, torch.device("cpu"))

    engine.release_memory_occupation()  # None: kv_cache and weights
    assert engine.released_memory == ["kv_cache", "weights"]
    assert engine.kv.allocated_bytes() == 0 and engine.kv.k == [] and engine.kv.v == []
    assert not any(_packed(engine))
    with pytest.raises(EngineError, match="released"):
        engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
    with pytest.raises(EngineError, match="weights are released"):
        engine.update_weights_from_tensor({"model.norm.weight": torch.ones(64)})
    with pytest.raises(EngineError, match="weights are released"):
        engine.get_weights_by_name("model.norm.weight")

    engine.resume_memory_occupation(["weights"])  # as slime: weights first (then update them), KV later
    assert _packed(engine) == packed and engine.released_memory == ["kv_cache"]
    with pytest.raises(EngineError, match="kv_cache"):
        engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
    engine.resume_memory_occupation(["kv_cache", "cuda_graph"])
    engine.resume_memory_occupation(["kv_cache"])  # resuming what is not released changes nothing
    assert engine.released_memory == []
    assert _outputs(engine) == before


def test_release_one_tag_at_a_time(engine):
    before, packed = _outputs(engine), _packed(engine)
    engine.release_memory_occupation(["kv_cache"])
    assert engine.kv.allocated_bytes() == 0 and _packed(engine) == packed  # the weights untouched
    engine.release_memory_occupation(["kv_cache"])  # releasing twice changes nothing
    engine.resume_memory_occupation(["kv_cache"])
    assert _outputs(engine) == before
    engine.release_memory_occupation(["weights", "cuda_graph"])
    assert engine.released_memory == ["weights"] and engine.kv.allocated_bytes() > 0
    engine.resume_memory_occupation()
    assert _outputs(engine) == before


def test_release_is_refused_with_requests_in_flight_or_bad_tags(engine):
    engine.pause_generation()
    engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, stream=True)  # submitted, held by the pause
    try:
        with pytest.raises(ValueError, match="in flight"):
            engine.release_memory_occupation()
        assert engine.released_memory == []
    finally:
        engine.abort_request(abort_all=True)
        engine.continue_generation()
    with pytest.raises(ValueError, match="unknown memory tag"):
        engine.release_memory_occupation(["kv"])
    with pytest.raises(ValueError, match="list of strings"):
        engine.resume_memory_occupation("weights")
    assert engine.released_memory == []
