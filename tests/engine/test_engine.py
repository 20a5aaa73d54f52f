"""tlt/engine/engine.py: the public API's contract on a tiny random Qwen3 model (float32).

Each test states its expectation exactly: token-for-token equality with a reference run (alone, fresh
engine, uninterrupted) or exact lengths and finish reasons.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import tlt
from tlt.engine.engine import EngineError
from tlt.engine.models.weights import WeightUpdateError
from tlt.engine.sampling_params import SamplingParamsError

VOCAB = 49152
EOS = 2


def random_prompts(lens, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, VOCAB, (n,), generator=g).tolist() for n in lens]  # ids < 20: special


def greedy(max_new: int, **kw) -> dict:
    return {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True, **kw}


def make_engine(path: str, **kw) -> tlt.Engine:
    kw = {"dtype": "float32", "device": "cpu", "random_seed": 0, "kv_cache_bytes": 1 << 24, **kw}
    return tlt.Engine(path, **kw)


@pytest.fixture(scope="module")
def qwen3(tiny_models) -> str:
    return tiny_models["qwen3"]


@pytest.fixture(scope="module")
def eng(qwen3):
    e = make_engine(qwen3)
    yield e
    e.shutdown()


@pytest.fixture
def fresh():
    """Factory of engines that are shut down after the test."""
    made = []

    def make(path, **kw):
        made.append(make_engine(path, **kw))
        return made[-1]

    yield make
    for e in made:
        e.shutdown()


def idle(e: tlt.Engine) -> bool:
    """Nothing queued, running, or holding KV rows."""
    return e.kv.num_rows == 0 and not e.scheduler.waiting and not e.scheduler.groups


def ids_of(outs) -> list[list[int]]:
    return [o["output_ids"] for o in outs]


# ---------------------------------------------------------------- batching
def test_greedy_output_does_not_depend_on_the_batch(eng):
    prompts = random_prompts((3, 17, 1, 40, 8, 25), seed=11)
    sps = [greedy(m) for m in (10, 4, 12, 7, 1, 9)]  # leave at different steps: rows are compacted
    alone = [eng.generate(input_ids=p, sampling_params=sp)["output_ids"] for p, sp in zip(prompts, sps)]
    assert [len(a) for a in alone] == [10, 4, 12, 7, 1, 9]
    assert eng.flush_cache()  # zero K/V: stale rows of the runs above must not mask a lost position
    together = eng.generate(input_ids=prompts, sampling_params=sps)
    assert ids_of(together) == alone
    # Staggered: two start, the rest join mid-decode (on zeroed K/V again).
    assert eng.flush_cache()
    its = [eng.generate(input_ids=prompts[i], sampling_params=sps[i], stream=True) for i in (0, 1)]
    next(its[0])
    next(its[0])
    rest = eng.generate(input_ids=prompts[2:], sampling_params=sps[2:])
    firsts = [list(it)[-1]["output_ids"] for it in its]
    assert firsts + ids_of(rest) == alone
    assert idle(eng)


def test_outputs_come_back_in_prompt_order_with_their_metadata(eng):
    prompts = random_prompts((5, 2, 9), seed=12)
    outs = eng.generate(input_ids=prompts, sampling_params=[greedy(3), greedy(1), greedy(2)],
                        rid=["a", "b", "c"])
    assert [o["meta_info"]["id"] for o in outs] == ["a", "b", "c"]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [5, 2, 9]
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [3, 1, 2]
    for o, m in zip(outs, (3, 1, 2)):
        assert o["meta_info"]["finish_reason"] == {"type": "length", "length": m}
    # text prompts: tokenized with the model's tokenizer, single prompt -> a dict
    out = eng.generate("Hello world", greedy(4))
    assert isinstance(out, dict)
    assert out["output_ids"] == eng.generate(input_ids=eng.tokenizer.encode("Hello world"),
                                             sampling_params=greedy(4))["output_ids"]
    assert out["text"] == eng.tokenizer.decode(out["output_ids"], skip_special_tokens=True)


# ---------------------------------------------------------------- n and seeds
def test_n_samples_prefill_the_prompt_once_and_are_seeded(eng):
    prompt = random_prompts((13,), seed=13)[0]
    sp = {"temperature": 1.0, "top_k": 50, "max_new_tokens": 6, "n": 4, "sampling_seed": 42,
          "ignore_eos": True}
    before = dict(eng.stats)
    outs = eng.generate(input_ids=prompt, sampling_params=sp)
    assert eng.stats["num_prefill_batches"] - before["num_prefill_batches"] == 1
    assert eng.stats["prompt_tokens"] - before["prompt_tokens"] == 13
    assert len(outs) == 4 and all(o["meta_info"]["prompt_tokens"] == 13 for o in outs)
    assert len({o["meta_info"]["id"] for o in outs}) == 4
    samples = ids_of(outs)
    assert len({tuple(s) for s in samples}) == 4  # distinct between samples
    assert ids_of(eng.generate(input_ids=prompt, sampling_params=sp)) == samples  # reproducible
    # Sample 0 of n is the n = 1 request with the same seed.
    assert eng.generate(input_ids=prompt, sampling_params={**sp, "n": 1})["output_ids"] == samples[0]


def test_sibling_samples_decode_on_the_shared_prompt_kv(eng):
    """Greedy siblings equal the single greedy run, and each seeded sample's logprobs equal the prompt
    logprobs of a fresh prefill of prompt + sample: the copied prompt K/V are those of the prompt."""
    prompt = random_prompts((21,), seed=14)[0]
    one = eng.generate(input_ids=prompt, sampling_params=greedy(8))["output_ids"]
    assert ids_of(eng.generate(input_ids=prompt, sampling_params=greedy(8, n=3))) == [one] * 3
    t = 0.7
    outs = eng.generate(input_ids=prompt, return_logprob=True,
                        sampling_params={"temperature": t, "max_new_tokens": 5, "n": 3, "sampling_seed": 9,
                                         "ignore_eos": True})
    for o in outs:
        gen = o["output_ids"]
        ref = eng.generate(input_ids=prompt + gen, return_logprob=True, logprob_start_len=len(prompt),
                           sampling_params={"temperature": t, "max_new_tokens": 0})
        got = [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]
        want = [lp for lp, _, _ in ref["meta_info"]["input_token_logprobs"]]
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)


def test_same_seed_same_tokens_whatever_the_batch_or_engine(eng, fresh, qwen3):
    prompt = random_prompts((7,), seed=15)[0]
    sp = {"temperature": 0.9, "max_new_tokens": 8, "sampling_seed": 1234, "ignore_eos": True}
    a = eng.generate(input_ids=prompt, sampling_params=sp)["output_ids"]
    assert eng.generate(input_ids=prompt, sampling_params=sp)["output_ids"] == a
    others = random_prompts((30, 2), seed=16)
    mixed = eng.generate(input_ids=[others[0], prompt, others[1]],
                         sampling_params=[{"temperature": 1.0, "max_new_tokens": 5}, sp, greedy(9)])
    assert mixed[1]["output_ids"] == a
    assert fresh(qwen3, random_seed=999).generate(input_ids=prompt, sampling_params=sp)["output_ids"] == a
    assert eng.generate(input_ids=prompt, sampling_params={**sp, "sampling_seed": 1235})["output_ids"] != a


def test_unseeded_sampling_follows_the_engine_random_seed(fresh, qwen3):
    prompt = random_prompts((7,), seed=17)[0]
    sp = {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True}
    a = fresh(qwen3, random_seed=5).generate(input_ids=prompt, sampling_params=sp)["output_ids"]
    assert fresh(qwen3, random_seed=5).generate(input_ids=prompt, sampling_params=sp)["output_ids"] == a
    assert fresh(qwen3, random_seed=6).generate(input_ids=prompt, sampling_params=sp)["output_ids"] != a


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
def test_first_token_follows_the_temperature_scaled_target_chi_square(fresh, qwen3, seeded):
    """2000 first tokens (n = 250 per call) against the target's own top-6 logprobs at T = 0.05, the rest
    of the vocabulary pooled: chi-square p > 0.01, for seeded rows (Gumbel-max) and unseeded rows (inverse
    CDF). Fixed seeds make it deterministic (seeded over 10,000 draws with other seeds: p = 0.27)."""
    from scipy import stats

    e = fresh(qwen3, kv_cache_bytes=1 << 26, max_running_requests=256)
    prompt, t = [100, 200, 300, 400], 0.05
    ref = e.generate(input_ids=prompt, sampling_params={"temperature": t, "max_new_tokens": 1},
                     return_logprob=True, top_logprobs_num=6)
    top = ref["meta_info"]["output_top_logprobs"][0]
    ids = [tok for _, tok, _ in top]
    p = np.exp([lp for lp, _, _ in top])
    p = np.append(p, 1 - p.sum())
    assert p[0] > 0.3 and p[-1] > 0.05  # a peaked distribution, with a tail: T is visible
    draws: list[int] = []
    for call in range(8):
        sp = {"temperature": t, "max_new_tokens": 1, "n": 250, **({"sampling_seed": call} if seeded else {})}
        draws += [o["output_ids"][0] for o in e.generate(input_ids=prompt, sampling_params=sp)]
    counts = np.array([draws.count(i) for i in ids])
    counts = np.append(counts, len(draws) - counts.sum())
    assert stats.chisquare(counts, p * len(draws)).pvalue > 0.01


# ---------------------------------------------------------------- min_new_tokens, EOS, stop
@pytest.fixture(scope="module")
def eos_engine(qwen3):
    """The tiny model made to prefer EOS everywhere: every embedding gets a large constant coordinate, so
    the final hidden state is dominated by it, and lm_head's EOS row gets the largest weight there."""
    e = make_engine(qwen3)
    emb = e.get_weights_by_name("model.embed_tokens.weight")
    head = e.get_weights_by_name("lm_head.weight")
    emb[:, 0] += 30.0
    head[EOS, 0] = head[:, 0].max() + 3.0
    e.update_weights_from_tensor([("model.embed_tokens.weight", emb), ("lm_head.weight", head)])
    yield e
    e.shutdown()


def test_eos_engine_stops_at_once(eos_engine):
    out = eos_engine.generate(input_ids=[100, 200, 300],
                              sampling_params={"temperature": 0, "max_new_tokens": 8})
    assert out["output_ids"] == [EOS]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert out["text"] == ""


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_new_tokens_suppresses_eos_until_reached(eos_engine, m, temperature):
    sp = {"temperature": temperature, "max_new_tokens": 12, "min_new_tokens": m, "sampling_seed": 3}
    out = eos_engine.generate(input_ids=[[100, 200, 300], [7, 8]], sampling_params=sp)
    for o in out:
        ids = o["output_ids"]
        assert len(ids) == m + 1 and ids[-1] == EOS and EOS not in ids[:-1], ids
        assert o["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}


def test_min_new_tokens_also_suppresses_stop_token_ids(eos_engine):
    prompt = [100, 200, 300]
    first = eos_engine.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 4,
                                                                   "min_new_tokens": 3})["output_ids"]
    x = first[0]  # the favourite once EOS is banned
    out = eos_engine.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 8,
                                                                 "min_new_tokens": 3, "stop_token_ids": [x]})
    ids = out["output_ids"]
    assert len(ids) == 4 and not {x, EOS} & set(ids[:3]) and ids[3] == EOS


def test_ignore_eos_keeps_generating(eos_engine):
    out = eos_engine.generate(input_ids=[100, 200, 300],
                              sampling_params={"temperature": 0, "max_new_tokens": 5, "ignore_eos": True})
    assert out["output_ids"] == [EOS] * 5
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert out["text"] == ""  # special tokens skipped by default
    raw = eos_engine.generate(input_ids=[100, 200, 300], sampling_params={
        "temperature": 0, "max_new_tokens": 2, "ignore_eos": True, "skip_special_tokens": False})
    assert raw["text"] == "<|im_end|><|im_end|>"


def _texts(eng, ids) -> list[str]:
    """decode(ids[:i]) for i = 0 .. len(ids)."""
    return [eng.tokenizer.decode(ids[:i], skip_special_tokens=True) for i in range(len(ids) + 1)]


@pytest.fixture(scope="module")
def reference_run(eng):
    """A greedy run whose decoded text grows by whole characters, to cut stop strings from."""
    for seed in range(20, 40):
        prompt = random_prompts((6,), seed=seed)[0]
        ids = eng.generate(input_ids=prompt, sampling_params=greedy(14))["output_ids"]
        texts = _texts(eng, ids)
        ok = all(texts[i + 1].startswith(texts[i]) and len(texts[i + 1]) > len(texts[i]) for i in range(14))
        if ok and "\ufffd" not in texts[-1] and len(set(ids)) == len(ids):
            return prompt, ids, texts
    pytest.fail("no prompt with a clean reference text")


def test_stop_string_trims_text_and_reports_the_match(eng, reference_run):
    prompt, ids, texts = reference_run
    k = 6  # the stop string is completed by token k (0-based): the last 2 characters before, 1 of token k
    stop = texts[k][-2:] + texts[k + 1][len(texts[k]):][:1]
    assert stop not in texts[k] and stop in texts[k + 1]
    sp = greedy(14, stop=["\x00never", stop])
    out = eng.generate(input_ids=prompt, sampling_params=sp)
    assert out["output_ids"] == ids[: k + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == texts[k + 1][: texts[k + 1].index(stop)]
    kept = eng.generate(input_ids=prompt, sampling_params={**sp, "no_stop_trim": True})
    assert kept["output_ids"] == ids[: k + 1] and kept["text"] == texts[k + 1]
    # a plain string is accepted for `stop`
    assert eng.generate(input_ids=prompt, sampling_params=greedy(14, stop=stop))["output_ids"] == ids[: k + 1]


def test_stop_strings_are_matched_in_the_output_only(eng, reference_run):
    prompt, ids, texts = reference_run
    prompt_text = eng.tokenizer.decode(prompt)
    pieces = [prompt_text[i:i + 3] for i in range(len(prompt_text) - 2)]
    stop = next((x for x in pieces if x not in texts[-1]), None)
    assert stop
    assert eng.generate(input_ids=prompt, sampling_params=greedy(14, stop=[stop]))["output_ids"] == ids


def test_stop_token_ids(eng, reference_run):
    prompt, ids, texts = reference_run
    x = ids[4]
    out = eng.generate(input_ids=prompt, sampling_params=greedy(14, stop_token_ids=[x]))
    assert out["output_ids"] == ids[:5]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": x}
    assert out["text"] == texts[4]  # the stop token's text is trimmed
    kept = eng.generate(input_ids=prompt, sampling_params=greedy(14, stop_token_ids=[x], no_stop_trim=True))
    assert kept["text"] == texts[5]


# ---------------------------------------------------------------- lengths
def test_max_new_tokens_zero_is_prefill_only(eng):
    prompt = random_prompts((9,), seed=18)[0]
    before = eng.stats["num_decode_steps"]
    out = eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                       logprob_start_len=0)
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert out["meta_info"]["completion_tokens"] == 0
    assert len(out["meta_info"]["input_token_logprobs"]) == 9
    assert out["meta_info"]["output_token_logprobs"] == []
    outs = eng.generate(input_ids=[prompt, prompt[:3]], sampling_params={"max_new_tokens": 0, "n": 2})
    assert ids_of(outs) == [[]] * 4
    assert eng.stats["num_decode_steps"] == before
    assert idle(eng)


def test_max_new_tokens_is_clipped_to_the_context_window(eng, fresh, qwen3):
    small = fresh(qwen3, context_length=64)
    prompt = random_prompts((60,), seed=19)[0]
    out = small.generate(input_ids=prompt, sampling_params=greedy(100))
    assert out["meta_info"]["completion_tokens"] == 4
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["output_ids"] == eng.generate(input_ids=prompt, sampling_params=greedy(4))["output_ids"]
    assert len(small.generate(input_ids=prompt + [5, 6, 7], sampling_params=greedy(10))["output_ids"]) == 1
    with pytest.raises(ValueError, match="context length"):
        small.generate(input_ids=prompt + [5, 6, 7, 8], sampling_params=greedy(1))
    assert idle(small)


# ---------------------------------------------------------------- streaming
def _check_stream(chunks, final, eng):
    assert len(chunks) == len(final["output_ids"])  # one chunk per token
    for i, c in enumerate(chunks):
        assert c["output_ids"] == final["output_ids"][: i + 1]
        assert c["text"] == eng.tokenizer.decode(c["output_ids"], skip_special_tokens=True)
        last = i == len(chunks) - 1
        assert (c["meta_info"]["finish_reason"] is not None) == last
    assert chunks[-1]["output_ids"] == final["output_ids"] and chunks[-1]["text"] == final["text"]
    assert chunks[-1]["meta_info"]["finish_reason"] == final["meta_info"]["finish_reason"]


def test_stream_sync_yields_growing_outputs_ending_with_the_finish(eng):
    prompt = random_prompts((5,), seed=21)[0]
    final = eng.generate(input_ids=prompt, sampling_params=greedy(7))
    chunks = list(eng.generate(input_ids=prompt, sampling_params=greedy(7), stream=True))
    _check_stream(chunks, final, eng)
    assert idle(eng)


def test_async_generate_and_async_stream(eng):
    prompts = random_prompts((5, 12, 3), seed=22)
    finals = [eng.generate(input_ids=p, sampling_params=greedy(6)) for p in prompts]

    async def main():
        gathered = await asyncio.gather(*[eng.async_generate(input_ids=p, sampling_params=greedy(6))
                                          for p in prompts])
        stream = await eng.async_generate(input_ids=prompts[0], sampling_params=greedy(6), stream=True)
        chunks = [c async for c in stream]
        batch = await eng.async_generate(input_ids=prompts, sampling_params=greedy(6))
        return gathered, chunks, batch

    gathered, chunks, batch = asyncio.run(main())
    assert ids_of(gathered) == ids_of(finals) == ids_of(batch)
    _check_stream(chunks, finals[0], eng)
    assert idle(eng)


# ---------------------------------------------------------------- abort
def test_abort_frees_rows_at_once_and_spares_the_others(eng):
    pa, pb, pc = random_prompts((9, 4, 15), seed=23)
    want_b = eng.generate(input_ids=pb, sampling_params=greedy(10))["output_ids"]
    want_c = eng.generate(input_ids=pc, sampling_params=greedy(10))["output_ids"]
    assert eng.flush_cache()  # zero K/V: stale rows of the runs above must not mask a lost position
    aborted_before = eng.stats["aborted_requests"]
    it_a = eng.generate(input_ids=pa, sampling_params=greedy(10), stream=True, rid="abort-a")
    it_b = eng.generate(input_ids=pb, sampling_params=greedy(10), stream=True, rid="abort-b")
    it_c = eng.generate(input_ids=pc, sampling_params=greedy(10), stream=True, rid="abort-c")
    for _ in range(3):
        next(it_a)
    assert eng.kv.num_rows == 3
    eng.abort_request("abort-a")  # row 0: the last row moves into its place
    assert eng.kv.num_rows == 2  # before any further step
    assert eng.stats["aborted_requests"] == aborted_before + 1
    last_a = list(it_a)[-1]
    assert last_a["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(last_a["output_ids"]) == 3
    assert list(it_b)[-1]["output_ids"] == want_b
    assert list(it_c)[-1]["output_ids"] == want_c
    assert idle(eng)


def test_abort_a_waiting_request_and_abort_all(fresh, qwen3):
    e = fresh(qwen3, max_running_requests=1)
    pa, pb = random_prompts((6, 6), seed=24)
    it_a = e.generate(input_ids=pa, sampling_params=greedy(8), stream=True, rid="run")
    it_b = e.generate(input_ids=pb, sampling_params=greedy(8), stream=True, rid="wait")
    next(it_a)
    assert e.kv.num_rows == 1 and len(e.scheduler.waiting) == 1
    e.abort_request("wait")
    assert not e.scheduler.waiting
    assert next(it_b)["meta_info"]["finish_reason"]["type"] == "abort"
    e.abort_request(abort_all=True)
    assert idle(e)
    assert list(it_a)[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    with pytest.raises(ValueError):
        e.abort_request()
    assert e.generate(input_ids=pa, sampling_params=greedy(2))["meta_info"]["completion_tokens"] == 2


# ---------------------------------------------------------------- bad input
BAD_REQUESTS = [
    (dict(prompt=""), ValueError, "empty prompt"),
    (dict(input_ids=[]), ValueError, "empty prompt"),
    (dict(input_ids=[[5, 6], []]), ValueError, "empty prompt"),
    (dict(input_ids=[5, VOCAB]), ValueError, "outside the vocabulary"),
    (dict(input_ids=[-1, 5]), ValueError, "outside the vocabulary"),
    (dict(input_ids=[5, 2.0]), ValueError, "integers"),
    (dict(input_ids=[5] * 600), ValueError, "context length"),
    (dict(prompt="hi", input_ids=[5]), ValueError, "exactly one"),
    (dict(), ValueError, "exactly one"),
    (dict(input_ids=[5], sampling_params={"max_new_tokens": -1}), SamplingParamsError, "max_new_tokens"),
    (dict(input_ids=[5], sampling_params={"min_new_tokens": -2}), SamplingParamsError, "min_new_tokens"),
    (dict(input_ids=[5], sampling_params={"temperature": -0.5}), SamplingParamsError, "temperature"),
    (dict(input_ids=[5], sampling_params={"temperature": float("nan")}), SamplingParamsError, "temperature"),
    (dict(input_ids=[5], sampling_params={"temperature": float("inf")}), SamplingParamsError, "temperature"),
    (dict(input_ids=[5], sampling_params={"top_p": 0.0}), SamplingParamsError, "top_p"),
    (dict(input_ids=[5], sampling_params={"top_k": 0}), SamplingParamsError, "top_k"),
    (dict(input_ids=[5], sampling_params={"min_p": 1.5}), SamplingParamsError, "min_p"),
    (dict(input_ids=[5], sampling_params={"repetition_penalty": 0}), SamplingParamsError, "repetition"),
    (dict(input_ids=[5], sampling_params={"n": 0}), SamplingParamsError, "n must be"),
    (dict(input_ids=[5], sampling_params={"stop": [""]}), SamplingParamsError, "stop"),
    (dict(input_ids=[5], sampling_params={"stop_token_ids": [VOCAB]}), ValueError, "stop_token_ids"),
    (dict(input_ids=[5], sampling_params={"bogus": 1}), SamplingParamsError, "unknown sampling parameter"),
    (dict(input_ids=[5], sampling_params={"regex": "a+"}), SamplingParamsError, "not supported"),
    (dict(input_ids=[5], sampling_params={"json_schema": "{}"}), SamplingParamsError, "not supported"),
    (dict(input_ids=[5], sampling_params={"logit_bias": {"5": 1.0}}), SamplingParamsError, "not supported"),
    (dict(input_ids=[5], return_logprob=True, top_logprobs_num=VOCAB + 1), ValueError, "top_logprobs_num"),
    (dict(input_ids=[5, 6], return_logprob=True, logprob_start_len=2), ValueError, "logprob_start_len"),
    (dict(input_ids=[5], image_data=["x.png"]), SamplingParamsError, "not supported"),
    (dict(input_ids=[5], no_such_argument=1), TypeError, "unknown argument"),
    # one bad entry rejects the whole batch, and nothing of it is queued
    (dict(input_ids=[[5, 6], [7]], sampling_params=[{}, {"max_new_tokens": -1}]), SamplingParamsError, "max"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_input_raises_a_clear_error_and_the_engine_keeps_serving(eng, kwargs, exc, match):
    prompt = random_prompts((6,), seed=25)[0]
    want = eng.generate(input_ids=prompt, sampling_params=greedy(5))["output_ids"]
    bystander = eng.generate(input_ids=prompt, sampling_params=greedy(5), stream=True)
    next(bystander)  # a request in flight when the bad one arrives
    with pytest.raises(exc, match=match):
        eng.generate(**{"sampling_params": {"min_new_tokens": 2, "max_new_tokens": 4}, **kwargs})
    assert list(bystander)[-1]["output_ids"] == want
    assert idle(eng)
    assert eng.generate(input_ids=prompt, sampling_params=greedy(5))["output_ids"] == want


def test_empty_unsupported_params_are_accepted(eng):
    prompt = random_prompts((6,), seed=26)[0]
    want = eng.generate(input_ids=prompt, sampling_params=greedy(5))["output_ids"]
    sp = greedy(5, regex=None, json_schema=None, ebnf="", structural_tag=None, logit_bias={}, stop=None,
                custom_params=None, sampling_seed=None)
    out = eng.generate(input_ids=prompt, sampling_params=sp, image_data=None, lora_path=None)
    assert out["output_ids"] == want


# ---------------------------------------------------------------- weight updates
def checksum(e: tlt.Engine) -> str:
    """sha256 over the bytes of every parameter (fused layout) and every HF-named weight."""
    h = hashlib.sha256()
    for name, p in sorted(e.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    for name, t in e.weights.named_hf_tensors():
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def derived_checkpoint(src: str, dst, config_changes: dict | None = None, tensors=None) -> str:
    """A copy of checkpoint `src` with config.json fields changed and/or other tensors."""
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            continue
        with open(os.path.join(src, f), "rb") as fin, open(os.path.join(dst, f), "wb") as fout:
            fout.write(fin.read())
    if config_changes:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        cfg.update(config_changes)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    tensors = tensors if tensors is not None else _load_safetensors(src)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


@pytest.fixture(scope="module")
def other_qwen3(qwen3, tmp_path_factory) -> str:
    """The tiny Qwen3 checkpoint with every tensor perturbed (same architecture, other weights)."""
    g = torch.Generator().manual_seed(1)
    tensors = {n: t + 0.5 * t.std() * torch.randn(t.shape, generator=g)
               for n, t in _load_safetensors(qwen3).items()}
    return derived_checkpoint(qwen3, tmp_path_factory.mktemp("qwen3_b"), tensors=tensors)


def _bad_update(e: tlt.Engine, case: str):
    q = e.get_weights_by_name("model.layers.0.self_attn.q_proj.weight")
    norm = e.get_weights_by_name("model.norm.weight")
    if case == "unknown name":
        return [("model.layers.0.self_attn.q_proj.wieght", q)]
    if case == "layer out of range":
        return [("model.layers.7.self_attn.q_proj.weight", q)]
    if case == "wrong shape":
        return [("model.layers.0.self_attn.q_proj.weight", q.t().contiguous())]
    if case == "integer dtype":
        return [("model.norm.weight", norm.to(torch.int32))]
    if case == "nan":
        return [("model.norm.weight", torch.where(torch.arange(len(norm)) == 3, float("nan"), norm))]
    if case == "inf":
        return [("model.norm.weight", torch.where(torch.arange(len(norm)) == 3, float("inf"), norm))]
    if case == "not a tensor":
        return [("model.norm.weight", norm.numpy())]
    if case == "good then bad":  # the good tensors must not land either
        return [("model.norm.weight", norm * 2), ("model.layers.1.mlp.up_proj.weight", q[:5])]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown name", "layer out of range", "wrong shape", "integer dtype", "nan",
                                  "inf", "not a tensor", "good then bad"])
def test_rejected_weight_update_leaves_every_weight_bit_identical(fresh, qwen3, case):
    e = fresh(qwen3)
    prompt = random_prompts((8,), seed=27)[0]
    want = e.generate(input_ids=prompt, sampling_params=greedy(6))["output_ids"]
    before = checksum(e)
    with pytest.raises(WeightUpdateError):
        e.update_weights_from_tensor(_bad_update(e, case), weight_version="bad")
    assert checksum(e) == before
    assert e.get_model_info()["weight_version"] == "default"
    out = e.generate(input_ids=prompt, sampling_params=greedy(6))
    assert out["output_ids"] == want and out["meta_info"]["weight_version"] == "default"


def test_weight_update_that_overflows_the_engine_dtype_is_rejected(fresh, qwen3):
    e = fresh(qwen3)
    before = checksum(e)
    norm = e.get_weights_by_name("model.norm.weight").double()
    norm[0] = 1e300
    try:
        e.update_weights_from_tensor([("model.norm.weight", norm)])
    except WeightUpdateError:
        pass
    assert checksum(e) == before


def test_weight_update_from_tensors_equals_a_fresh_engine_on_the_new_weights(fresh, qwen3, other_qwen3):
    e = fresh(qwen3)
    ref = fresh(other_qwen3)
    prompts = random_prompts((3, 14, 30), seed=28)
    sp = {"temperature": 0, "max_new_tokens": 8}
    before = ids_of(e.generate(input_ids=prompts, sampling_params=sp))
    want = ref.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
    assert ids_of(want) != before  # the update must show
    ok, _ = e.update_weights_from_tensor(sorted(_load_safetensors(other_qwen3).items()), weight_version="v2")
    assert ok
    got = e.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
    assert ids_of(got) == ids_of(want)
    for g, w in zip(got, want):
        assert g["meta_info"]["output_token_logprobs"] == w["meta_info"]["output_token_logprobs"]
        assert g["meta_info"]["weight_version"] == "v2"
    assert e.get_model_info()["weight_version"] == "v2"
    assert checksum(e) == checksum(ref)


def test_partial_weight_update_replaces_exactly_that_tensor(fresh, qwen3):
    e = fresh(qwen3)
    name = "model.layers.1.self_attn.k_proj.weight"
    new = torch.randn_like(e.get_weights_by_name(name))
    untouched = {n: t.clone() for n, t in e.weights.named_hf_tensors() if n != name}
    e.update_weights_from_tensor({name: new})  # a dict is accepted too
    assert torch.equal(e.get_weights_by_name(name), new)
    assert all(torch.equal(t, untouched[n]) for n, t in e.weights.named_hf_tensors() if n != name)
    assert e.get_model_info()["weight_version"] == "default"  # no version given: unchanged


def test_update_weights_from_disk_equals_a_fresh_engine(fresh, qwen3, other_qwen3):
    e = fresh(qwen3)
    ref = fresh(other_qwen3)
    e.update_weights_from_disk(other_qwen3, weight_version="disk-1")
    assert checksum(e) == checksum(ref)
    prompts = random_prompts((5, 19), seed=29)
    sp = {"temperature": 0, "max_new_tokens": 8}
    got = e.generate(input_ids=prompts, sampling_params=sp)
    assert ids_of(got) == ids_of(ref.generate(input_ids=prompts, sampling_params=sp))
    assert all(o["meta_info"]["weight_version"] == "disk-1" for o in got)


def test_rejected_update_from_disk_changes_nothing(fresh, qwen3, tiny_models, tmp_path):
    e = fresh(qwen3)
    before = checksum(e)
    tensors = _load_safetensors(qwen3)
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    with pytest.raises(WeightUpdateError, match="lacks"):
        e.update_weights_from_disk(derived_checkpoint(qwen3, tmp_path / "partial", tensors=tensors))
    with pytest.raises(WeightUpdateError, match="architecture"):
        e.update_weights_from_disk(tiny_models["qwen2"])
    with pytest.raises(FileNotFoundError):
        e.update_weights_from_disk(str(tmp_path / "nowhere"))
    assert checksum(e) == before
    # Another head split with tensors of the very same shapes (Llama: no q/k norm to give it away).
    llama_path = tiny_models["llama"]
    llama = fresh(llama_path)
    before = checksum(llama)
    heads8 = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8}
    split = derived_checkpoint(llama_path, tmp_path / "heads8", heads8)
    with pytest.raises(WeightUpdateError, match="architecture"):
        llama.update_weights_from_disk(split)
    # and an untied checkpoint (its own lm_head) into a model with tied embeddings
    tensors = _load_safetensors(llama_path)
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    untied = derived_checkpoint(llama_path, tmp_path / "untied", {"tie_word_embeddings": False},
                                tensors=tensors)
    with pytest.raises(WeightUpdateError, match="architecture"):
        llama.update_weights_from_disk(untied)
    assert checksum(llama) == before


def test_model_info_and_flush_cache(eng, qwen3):
    info = eng.get_model_info()
    assert info["model_type"] == "qwen3" and info["dtype"] == "float32" and info["vocab_size"] == VOCAB
    assert info["context_length"] == 512 and info["weight_version"] == "default"
    it = eng.generate(input_ids=[5, 6, 7], sampling_params=greedy(4), stream=True)
    next(it)
    assert eng.flush_cache() is False  # not while a request is in flight (as SGLang)
    list(it)
    assert eng.flush_cache() is True
    assert eng.kv.allocated_bytes() == 0
    assert eng.generate(input_ids=[5, 6, 7], sampling_params=greedy(4))["meta_info"]["completion_tokens"] == 4


def test_engine_arguments_are_validated_and_shutdown_is_final(fresh, qwen3):
    with pytest.raises(TypeError, match="unknown engine argument"):
        tlt.Engine(qwen3, no_such_knob=1)
    with pytest.raises(ValueError, match="dtype"):
        tlt.Engine(qwen3, dtype="float8")
    with pytest.raises(ValueError, match="kv_cache_bytes"):  # less than one full-length sequence
        tlt.Engine(qwen3, dtype="float32", kv_cache_bytes=1000)
    e = fresh(qwen3)
    it = e.generate(input_ids=[5, 6, 7], sampling_params=greedy(8), stream=True)
    next(it)
    e.shutdown()
    assert next(it)["meta_info"]["finish_reason"]["type"] == "abort"
    with pytest.raises(EngineError):
        e.generate(input_ids=[5, 6], sampling_params=greedy(2))
    with pytest.raises(EngineError):
        e.update_weights_from_tensor([])


def test_tied_lm_head_reads_as_the_embedding(tiny_models):
    e = tlt.Engine(tiny_models["llama"], dtype="float32")  # the tiny llama ties its embeddings
    assert torch.equal(e.get_weights_by_name("lm_head.weight"), e.get_weights_by_name("model.embed_tokens.weight"))
    e.shutdown()
