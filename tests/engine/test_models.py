"""tlt/engine/models: the decoder and loaders against `transformers`, in float32.

Greedy tokens must be identical and log-probabilities within 1e-4 for a random tiny checkpoint of each
family (Llama tied, Llama-3 rope scaling, Qwen2 qkv bias, Qwen3 q/k norm), in batches of mixed prompt
lengths; the real SmolLM2 GGUF must load to transformers' own tensors and decode as transformers does.
"""

from __future__ import annotations

import os

import pytest
import torch

import tlt

FAMILIES = ("llama", "llama3", "qwen2", "qwen3")
LENS = (1, 4, 11, 37, 90)  # 90 > 64: past the Llama-3 scaling's original context
ATOL = 1e-4


def random_prompts(lens, seed: int, vocab: int = 49152) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(20, vocab, (n,), generator=g).tolist() for n in lens]  # ids < 20: special


@pytest.fixture(scope="module")
def pairs(tiny_models):
    """family -> (tlt engine, transformers model), built on first use."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, tuple] = {}

    def get(fam: str):
        if fam not in cache:
            path = tiny_models[fam]
            eng = tlt.Engine(path, dtype="float32", device="cpu", random_seed=0, kv_cache_bytes=1 << 24)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            cache[fam] = (eng, hf)
        return cache[fam]

    yield get
    for eng, _ in cache.values():
        eng.shutdown()


def hf_greedy(hf, prompt: list[int], max_new: int, repetition_penalty: float = 1.0) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt (stops at EOS, as tlt does)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                          repetition_penalty=repetition_penalty, eos_token_id=2, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def hf_logprobs(hf, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) of transformers' forward over `ids`: row t predicts ids[t + 1]. [L, V]"""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_matches_transformers(pairs, family, repetition_penalty):
    """A batch of mixed prompt lengths decodes token-identically to transformers on each prompt alone."""
    eng, hf = pairs(family)
    prompts = random_prompts(LENS, seed=len(family))
    sp = {"temperature": 0, "max_new_tokens": 12, "repetition_penalty": repetition_penalty}
    outs = eng.generate(input_ids=prompts, sampling_params=sp)
    for prompt, out in zip(prompts, outs):
        assert out["output_ids"] == hf_greedy(hf, prompt, 12, repetition_penalty), len(prompt)


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_transformers(pairs, family):
    """output_token_logprobs, input_token_logprobs (start 0: first is None) and top-k, within 1e-4."""
    eng, hf = pairs(family)
    prompts = random_prompts((1, 6, 29), seed=100 + len(family))
    outs = eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 6},
                        return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    for prompt, out in zip(prompts, outs):
        meta, gen = out["meta_info"], out["output_ids"]
        ref = hf_logprobs(hf, prompt + gen)  # [L + n, V]
        L = len(prompt)
        inp = meta["input_token_logprobs"]
        assert len(inp) == L and inp[0] == (None, prompt[0], None)
        for t in range(1, L):
            lp, tok, text = inp[t]
            assert tok == prompt[t] and text is None
            assert abs(lp - ref[t - 1, tok].item()) < ATOL, (L, t)
        outp = meta["output_token_logprobs"]
        assert [tok for _, tok, _ in outp] == gen
        for i, (lp, tok, _) in enumerate(outp):
            assert abs(lp - ref[L - 1 + i, tok].item()) < ATOL, (L, i)
            assert tok == ref[L - 1 + i].argmax().item()  # greedy = argmax of the reference
        # top-k: three entries, each the reference logprob of its id, in descending order, the first
        # being the chosen (greedy) token; the input side starts with None.
        for i, top in enumerate(meta["output_top_logprobs"]):
            assert len(top) == 3 and top[0][1] == gen[i]
            assert all(abs(lp - ref[L - 1 + i, tok].item()) < ATOL for lp, tok, _ in top)
            assert [lp for lp, _, _ in top] == sorted((lp for lp, _, _ in top), reverse=True)
            ref_top = ref[L - 1 + i].topk(3).values
            assert torch.allclose(torch.tensor([lp for lp, _, _ in top]), ref_top, atol=ATOL)
        itop = meta["input_top_logprobs"]
        assert len(itop) == L and itop[0] is None
        for t in range(1, L):
            assert torch.allclose(torch.tensor([lp for lp, _, _ in itop[t]]), ref[t - 1].topk(3).values,
                                  atol=ATOL)


def test_prompt_logprobs_from_a_later_start(pairs):
    eng, hf = pairs("qwen2")
    prompt = random_prompts((20,), seed=7)[0]
    out = eng.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 1},
                       return_logprob=True, logprob_start_len=8, return_text_in_logprobs=True)
    ref = hf_logprobs(hf, prompt)
    inp = out["meta_info"]["input_token_logprobs"]
    assert [tok for _, tok, _ in inp] == prompt[8:]
    for j, (lp, tok, text) in enumerate(inp):
        assert lp is not None and abs(lp - ref[8 + j - 1, tok].item()) < ATOL
        assert text == eng.tokenizer.decode([tok])


def test_sampled_logprobs_are_after_temperature(pairs):
    """With temperature T, returned logprobs are log_softmax(logits / T) of the target (all n samples)."""
    eng, hf = pairs("qwen3")
    prompt = random_prompts((9,), seed=8)[0]
    t = 0.6
    outs = eng.generate(input_ids=prompt, return_logprob=True, logprob_start_len=0,
                        sampling_params={"temperature": t, "max_new_tokens": 6, "n": 3, "sampling_seed": 5})
    for out in outs:
        gen = out["output_ids"]
        ref = hf_logprobs(hf, prompt + gen, temperature=t)
        for i, (lp, tok, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
            assert abs(lp - ref[len(prompt) - 1 + i, tok].item()) < ATOL
        for j, (lp, tok, _) in enumerate(out["meta_info"]["input_token_logprobs"][1:], start=1):
            assert abs(lp - ref[j - 1, tok].item()) < ATOL


# ---------------------------------------------------------------- the real model (slow)
@pytest.fixture(scope="module")
def hf_smol():
    """transformers' own GGUF loading of the embedded SmolLM2 file (dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    from tlt.engine.models.weights import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.mark.slow
def test_gguf_tensors_equal_transformers_gguf_loading(smol_engine, hf_smol):
    sd = hf_smol.state_dict()
    ours = dict(smol_engine.weights.named_hf_tensors())
    assert set(ours) == set(sd) - {"lm_head.weight"}  # tied: lm_head is the embedding
    assert smol_engine.model_config.tie_word_embeddings
    for name, t in ours.items():
        assert torch.equal(t, sd[name]), name
    cfg = hf_smol.config
    mc = smol_engine.model_config
    assert (mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.intermediate_size) == (
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
        cfg.intermediate_size)
    assert mc.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    assert mc.rope_theta == cfg.rope_parameters["rope_theta"]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smol_engine, hf_smol):
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ids = [smol_engine.tokenizer.encode(p) for p in prompts]
    outs = smol_engine.generate(prompts, {"temperature": 0, "max_new_tokens": 16})
    for p, out in zip(ids, outs):
        assert out["output_ids"] == hf_greedy(hf_smol, p, 16)
        assert out["text"] == smol_engine.tokenizer.decode(out["output_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_kernels", [True, False])
def test_fp32_linear_inference_paths(bias, with_kernels, monkeypatch):
    """float32 on CPU: Linear reads few rows through the C kernel (`kernels.linear_f32`), or without the kernels
    through a transposed weight copy above three rows (torch's general GEMM is slow at 4-16 rows); either way
    the same linear map, refreshed by pack() after a weight update."""
    from tlt.engine import kernels
    from tlt.engine.models.decoder import FP32_KERNEL_ROWS, Linear

    if with_kernels and not kernels.available():
        pytest.skip("no C compiler: kernels not built")
    if not with_kernels:
        monkeypatch.setattr(kernels, "available", lambda: False)
    torch.manual_seed(0)
    lin = Linear(24, 40, bias=bias)
    lin.pack(True)
    assert lin.packed is None
    if with_kernels:
        assert lin.fp32_kernel and lin.weight_t is None
    else:
        assert not lin.fp32_kernel and lin.weight_t is not None and lin.weight_t.is_contiguous()
    for rows in (1, 3, 4, 9, FP32_KERNEL_ROWS + 1):
        x = torch.randn(2, rows, 24)
        assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(2)  # a weight update: a copy is stale until pack() runs again, as for bf16's
    lin.pack(True)
    x = torch.randn(5, 24)
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5)
    lin.pack(False)
    assert lin.weight_t is None and not lin.fp32_kernel
