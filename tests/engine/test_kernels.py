"""Fused bf16 CPU kernels (tlt/engine/kernels): bit-equal to the torch ops they replace, written in
transformers' rounding order, and the fused model forward close to the pure-torch one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tlt.engine import kernels
from tlt.engine.models.rope import RotaryTable, apply_rotary

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: fused CPU kernels not built")


def _assert_rounding_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal but for rare one-step bf16 rounding flips (float32 sums in another order)."""
    diff = a != b
    assert diff.float().mean() < 0.01
    ulp = 2.0 ** (torch.floor(torch.log2(b.float().abs().clamp_min(1e-30))) - 7)
    assert ((a.float() - b.float()).abs() <= 2 * ulp + 1e-30).all()


def _hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm in bf16, op by op as transformers writes it."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_add_rms_norm_equals_torch(n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, 576, generator=g) * 3).bfloat16()
    d = torch.randn(n, 576, generator=g).bfloat16()
    w = (torch.rand(576, generator=g) + 0.5).bfloat16()
    x2, h = kernels.add_rms_norm(x, d, w, 1e-5)
    assert torch.equal(x2, x + d)
    _assert_rounding_close(h, _hf_rms_norm(x + d, w, 1e-5))
    x3, h3 = kernels.add_rms_norm(x, None, w, 1e-5)
    assert torch.equal(x3, x)
    _assert_rounding_close(h3, _hf_rms_norm(x, w, 1e-5))


def test_silu_mul_equals_torch():
    g = torch.Generator().manual_seed(0)
    gu = (torch.randn(33, 2 * 1536, generator=g) * 6).bfloat16()
    gu[0, :4] = torch.tensor([0.0, -100.0, 100.0, float("nan")])
    gate, up = gu.split(1536, dim=-1)
    out = kernels.silu_mul(gu)
    ref = F.silu(gate) * up
    assert torch.equal(out[1:], ref[1:])
    assert torch.equal(out[0, :3], ref[0, :3]) and torch.equal(out[0, 4:], ref[0, 4:])
    assert out[0, 3].isnan() and ref[0, 3].isnan()


def test_rope_kv_equals_torch_and_writes_only_its_slots():
    g = torch.Generator().manual_seed(0)
    nh, kvh, d, n, max_len = 6, 2, 32, 10, 64
    table = RotaryTable(d, 10000.0, None, max_len, "cpu", torch.bfloat16)
    qkv = torch.randn(n, (nh + 2 * kvh) * d, generator=g).bfloat16()
    pos = torch.randint(0, max_len, (n,), generator=g)
    rows = torch.arange(n) % 4
    slots = torch.randperm(max_len, generator=g)[:n]  # tree nodes: slot != position
    kc = torch.full((5, kvh, max_len, d), 7.0, dtype=torch.bfloat16)
    vc = kc.clone()
    q = kernels.rope_kv(qkv, table.cos, table.sin, pos, rows, slots, kc, vc, nh)
    qk = qkv[:, : (nh + kvh) * d].view(n, 1, nh + kvh, d)
    cos, sin = table.lookup(pos.view(n, 1))
    ref = apply_rotary(qk, cos, sin).view(n, nh + kvh, d)
    assert torch.equal(q, ref[:, :nh])
    assert torch.equal(kc[rows, :, slots], ref[:, nh:])
    assert torch.equal(vc[rows, :, slots], qkv[:, (nh + kvh) * d:].view(n, kvh, d))
    written = torch.zeros(5, max_len, dtype=torch.bool)
    written[rows, slots] = True
    assert (kc.transpose(1, 2)[~written] == 7).all() and (vc.transpose(1, 2)[~written] == 7).all()


def test_kernels_refuse_bad_tensors():
    with pytest.raises(ValueError):
        kernels.silu_mul(torch.randn(2, 8))  # float32
    with pytest.raises(ValueError):
        kernels.silu_mul(torch.randn(8, 2).bfloat16().t())  # not contiguous


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_forward_matches_torch_forward(tiny_models, family):
    """The whole bf16 forward (prefill then decode of a ragged batch): fused vs pure torch. Float32 sums in
    another order flip a rare rounding, and flips grow through the layers: close, not equal."""
    import tlt

    eng = tlt.Engine(model_path=tiny_models[family], dtype="bfloat16", random_seed=0)
    try:
        assert eng.model.fused_cpu
        prompts = [[5, 9, 11, 3, 8, 2], [7, 1], [4, 4, 4, 9]]
        sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
        outs = {}
        for fused in (True, False):
            eng.model.fused_cpu = fused
            res = eng.generate(input_ids=prompts, sampling_params=sp, return_logprob=True, logprob_start_len=0)
            outs[fused] = res
        for a, b in zip(outs[True], outs[False]):
            la = [t[0] for t in a["meta_info"]["input_token_logprobs"][1:]]
            lb = [t[0] for t in b["meta_info"]["input_token_logprobs"][1:]]
            assert max(abs(u - v) for u, v in zip(la, lb)) < 0.1
            # The first emitted token's logprob (same context on both paths).
            first_a, first_b = a["meta_info"]["output_token_logprobs"][0], b["meta_info"]["output_token_logprobs"][0]
            assert abs(first_a[0] - first_b[0]) < 0.1
    finally:
        eng.shutdown()


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("TLT_CPU_KERNELS", "0")
    assert not kernels.available()


def test_argmax_equals_torch_on_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5000, generator=g)
    x[1, [10, 20]] = 50.0  # tie: the first index wins
    x[2, [30, 40]] = float("nan")  # NaN is the maximum, the first one wins
    x[3] = 0.0
    x[4, -1] = float("inf")
    x[5] = float("-inf")
    assert torch.equal(kernels.argmax(x), x.argmax(dim=-1))
    assert kernels.argmax(x)[1] == 10 and kernels.argmax(x)[2] == 30


def test_fused_decoder_layer_matches_torch_layer():
    """The drafter's layer (DecoderLayer.forward with fused=True) vs the torch ops, on a tree-shaped batch."""
    from tlt.engine.models.decoder import AttentionBatch, DecoderLayer
    from tlt.engine.models.model_config import ModelConfig

    cfg = ModelConfig(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      rope_scaling=None, tie_word_embeddings=True, attention_bias=False, qk_norm=False,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    layer = DecoderLayer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    layer = layer.bfloat16()
    for m in layer.modules():
        if hasattr(m, "pack"):
            m.pack(True)
    B, T, L = 2, 3, 10
    table = RotaryTable(16, 10000.0, None, 64, "cpu", torch.bfloat16)
    positions = torch.tensor([[6, 7, 7], [3, 4, 4]])
    slots = torch.tensor([[7, 8, 9], [4, 5, 6]])
    mask = torch.zeros(B, 1, T, L, dtype=torch.bool)
    for b, n in enumerate((7, 4)):
        mask[b, 0, :, :n] = True
        mask[b, 0, torch.arange(T), slots[b]] = True
        mask[b, 0, 1:, slots[b, 0]] = True
    batch = AttentionBatch(0, positions, mask, L, torch.arange(B).view(B, 1).expand(B, T), slots)
    x = torch.randn(B, T, 64).bfloat16()
    cos, sin = table.lookup(positions)
    k0 = torch.randn(B, 2, 16, 16).bfloat16()
    v0 = torch.randn(B, 2, 16, 16).bfloat16()
    outs = {}
    for fused in (True, False):
        layer.fused = fused
        k, v = k0.clone(), v0.clone()
        outs[fused] = (layer(x, cos, sin, k, v, batch), k, v)
    _assert_rounding_close(outs[True][1], outs[False][1])  # K/V as written: one rounding step at most
    _assert_rounding_close(outs[True][2], outs[False][2])
    a, b = outs[True][0].float(), outs[False][0].float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


@pytest.mark.parametrize("rows,inp,out", [(1, 576, 960), (4, 576, 3072), (7, 40, 13), (13, 1536, 6), (64, 17, 5)])
def test_linear_f32_equals_torch_and_rows_do_not_depend_on_each_other(rows, inp, out):
    """The float32 few-row linear: torch's linear map (another summation order: within float32 rounding), and
    each row's result bit-identical to computing that row alone (decode and verify passes agree)."""
    g = torch.Generator().manual_seed(rows * 1000 + inp)
    x, w = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g)
    y = kernels.linear_f32(x, w)
    ref = F.linear(x.double(), w.double()).float()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * inp ** 0.5)
    for r in {0, rows // 2, rows - 1}:
        assert torch.equal(y[r : r + 1], kernels.linear_f32(x[r : r + 1].contiguous(), w))


def test_linear_f32_refuses_bad_tensors():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="features"):
        kernels.linear_f32(torch.randn(2, 15), w)
    with pytest.raises(ValueError, match="float32"):
        kernels.linear_f32(torch.randn(2, 16).bfloat16(), w)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.linear_f32(torch.randn(16, 2).t(), w)


@pytest.mark.skipif(not kernels.linear_bf16_available(), reason="CPU without AVX512-BF16")
@pytest.mark.parametrize("rows,inp,out", [(1, 576, 960), (4, 576, 3072), (3, 40, 13), (6, 1536, 6), (9, 17, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_bf16_rounds_the_float32_sum_once_and_rows_do_not_depend_on_each_other(rows, inp, out, bias):
    """The bf16 few-row linear: the exact sum of bf16 products, rounded once to bf16 (the float32 accumulation
    may move the result by one bf16 step, as another summation order would); each row bit-identical to
    computing it alone."""
    g = torch.Generator().manual_seed(rows * 1000 + inp)
    x, w = torch.randn(rows, inp, generator=g).bfloat16(), torch.randn(out, inp, generator=g).bfloat16()
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    y = kernels.linear_bf16(x, w, b)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    _assert_rounding_close(y, exact.bfloat16())
    for r in {0, rows // 2, rows - 1}:
        assert torch.equal(y[r : r + 1], kernels.linear_bf16(x[r : r + 1].contiguous(), w, b))


def test_amx_pack_layout():
    """Tile (n, k) holds weight[16 n + j, 32 k + 2 kk + p] at [kk, j, p], zero-padded."""
    w = torch.arange(20 * 40, dtype=torch.float32).view(20, 40).bfloat16()
    t = kernels.amx_pack(w)
    assert t.shape == (2, 2, 16, 16, 2)
    for n, k, kk, j, p in [(0, 0, 0, 0, 0), (0, 1, 3, 5, 1), (1, 0, 15, 3, 1), (1, 1, 2, 3, 0)]:
        o, i = 16 * n + j, 32 * k + 2 * kk + p
        assert t[n, k, kk, j, p] == (w[o, i] if o < 20 and i < 40 else 0)


@pytest.mark.skipif(not kernels.amx_available(), reason="CPU or OS without AMX")
@pytest.mark.parametrize("rows,inp,out", [(1, 576, 960), (16, 576, 64), (3, 40, 13), (17, 1536, 6), (40, 64, 35)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_amx_rounds_the_float32_sum_once_and_rows_do_not_depend_on_each_other(rows, inp, out, bias):
    """The AMX linear: the exact sum rounded once to bf16 (up to float32 accumulation order), every row
    bit-identical to computing it alone, whether it shares a 16-row tile or a pair of tiles with others."""
    g = torch.Generator().manual_seed(rows * 1000 + inp)
    x, w = torch.randn(rows, inp, generator=g).bfloat16(), torch.randn(out, inp, generator=g).bfloat16()
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    tiles = kernels.amx_pack(w)
    y = kernels.linear_amx(x, tiles, out, b)
    _assert_rounding_close(y, F.linear(x.double(), w.double(), None if b is None else b.double()).bfloat16())
    for r in {0, rows // 2, rows - 1}:
        assert torch.equal(y[r : r + 1], kernels.linear_amx(x[r : r + 1].contiguous(), tiles, out, b))
    with pytest.raises(ValueError, match="tiles"):
        kernels.linear_amx(x, tiles, out + 16, b)


@pytest.mark.skipif(not kernels.amx_available(), reason="CPU or OS without AMX")
def test_linear_amx_and_onednn_interleave_on_the_same_threads():
    """Both configure AMX tiles on torch's threads: alternating calls must not see each other's tile state."""
    from tlt.engine.models.decoder import packed_linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 576, generator=g).bfloat16()
    packed, tiles = torch.ops.mkldnn._reorder_linear_weight(w), kernels.amx_pack(w)
    many, few = torch.randn(64, 576, generator=g).bfloat16(), torch.randn(3, 576, generator=g).bfloat16()
    ref_many, ref_few = packed_linear(many, packed), kernels.linear_amx(few, tiles, 256)
    _assert_rounding_close(ref_few, F.linear(few.double(), w.double()).bfloat16())
    for _ in range(3):
        assert torch.equal(kernels.linear_amx(few, tiles, 256), ref_few)
        assert torch.equal(packed_linear(many, packed), ref_many)
    _assert_rounding_close(ref_many, F.linear(many.double(), w.double()).bfloat16())


@pytest.mark.skipif(not kernels.amx_available(), reason="CPU or OS without AMX")
def test_linear_amx_of_no_rows():
    w = torch.randn(20, 40).bfloat16()
    assert kernels.linear_amx(torch.empty(0, 40, dtype=torch.bfloat16), kernels.amx_pack(w), 20).shape == (0, 20)


def _attention_reference(q, kc, vc, row_start, kv_len, mask):
    """float32 SDPA on the same bf16 values: [B, T, heads, D]."""
    B = q.shape[0]
    k = kc[row_start : row_start + B, :, :kv_len].float()
    v = vc[row_start : row_start + B, :, :kv_len].float()
    m = None if mask is None else mask[:, None]
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k, v, attn_mask=m, enable_gqa=True)
    return out.transpose(1, 2)


_ATTN_CASES = [  # B, T, heads, kv_heads, D, max_len, kv_len, row_start
    (3, 1, 9, 3, 64, 200, 150, 1),  # SmolLM2's heads, a decode pass
    (2, 8, 9, 3, 64, 300, 299, 0),  # a verify pass
    (1, 17, 4, 4, 128, 50, 37, 2),  # more than 16 query vectors per (sequence, kv head); no GQA
    (4, 1, 8, 2, 32, 40, 33, 0),  # keys not a multiple of 16
    (1, 70, 9, 3, 64, 96, 80, 0),  # more queries than one kernel call takes (ATTENTION_CHUNK): a prefill
]


@pytest.mark.skipif(not kernels.attention_available(64), reason="CPU without AVX512-BF16")
@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("case", _ATTN_CASES)
def test_attention_matches_float32_sdpa_and_each_query_is_independent(case, amx):
    if amx and not kernels.amx_available():
        pytest.skip("CPU or OS without AMX")
    B, T, nh, kvh, d, max_len, kv_len, rs = case
    g = torch.Generator().manual_seed(sum(case))
    kc = torch.randn(rs + B + 1, kvh, max_len, d, generator=g).bfloat16()
    vc = torch.randn(kc.shape, generator=g).bfloat16()
    q = torch.randn(B, T, nh, d, generator=g).bfloat16()
    lens = torch.randint(1, kv_len + 1, (B,), generator=g)
    lens[0] = kv_len
    mask = (torch.arange(kv_len).view(1, 1, kv_len) < lens.view(B, 1, 1)).expand(B, T, kv_len)
    mask = mask & (torch.rand(B, T, kv_len, generator=g) < 0.8)  # holes, as a tree mask has
    mask[:, :, 0] = True
    for m in (None, mask):
        out = kernels.attention(q, kc, vc, rs, kv_len, m, amx=amx)
        ref = _attention_reference(q, kc, vc, rs, kv_len, m)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        # bf16 output of float32 sums: within a few bf16 steps of the float32 reference
        assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    full = kernels.attention(q, kc, vc, rs, kv_len, mask, amx=amx)
    for b in range(B):
        for t in range(T):  # alone, as in a decode pass of one sequence: the same bits
            one = kernels.attention(q[b : b + 1, t : t + 1].contiguous(), kc, vc, rs + b, kv_len,
                                    mask[b : b + 1, t : t + 1].contiguous(), amx=amx)
            assert torch.equal(one[0, 0], full[b, t])
    # keys past the last visible one are never read: NaN there changes nothing
    kc2, vc2 = kc.clone(), vc.clone()
    for b in range(B):
        kc2[rs + b, :, int(lens[b]):] = float("nan")
        vc2[rs + b, :, int(lens[b]):] = float("nan")
    assert torch.equal(kernels.attention(q, kc2, vc2, rs, kv_len, mask, amx=amx), full)


@pytest.mark.skipif(not kernels.attention_available(64), reason="CPU without AVX512-BF16")
def test_attention_of_nothing_visible_is_zero_and_bad_input_is_refused():
    kc = torch.randn(2, 1, 32, 64).bfloat16()
    q = torch.randn(2, 1, 2, 64).bfloat16()
    mask = torch.ones(2, 1, 20, dtype=torch.bool)
    mask[1] = False
    out = kernels.attention(q, kc, kc, 0, 20, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    with pytest.raises(ValueError):
        kernels.attention(q, kc, kc, 1, 20, mask)  # rows past the cache
    with pytest.raises(ValueError):
        kernels.attention(q, kc, kc, 0, 40, None)  # more keys than slots
    with pytest.raises(ValueError):
        kernels.attention(q, kc, kc, 0, 20, mask.float())
    with pytest.raises(RuntimeError):
        kernels.attention(torch.randn(2, 1, 2, 48).bfloat16(), kc[..., :48].contiguous(), kc[..., :48].contiguous(), 0,
                          20, None)  # a head size it does not take


@pytest.mark.skipif(not kernels.amx_available(), reason="CPU or OS without AMX")
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 64])
def test_linear_amx_silu_equals_the_two_steps(rows):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(2 * 48, 80, generator=g) * 0.2).bfloat16()  # half = 48: three 16-column blocks per half
    x = torch.randn(rows, 80, generator=g).bfloat16()
    tiles = kernels.amx_pack(w)
    fused = kernels.linear_amx_silu(x, tiles, 48)
    assert torch.equal(fused, kernels.silu_mul(kernels.linear_amx(x, tiles, 96)))
    ref = F.silu(x.float() @ w[:48].float().T) * (x.float() @ w[48:].float().T)
    assert (fused.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    with pytest.raises(ValueError):
        kernels.linear_amx_silu(x, kernels.amx_pack(w[:, :64].contiguous()), 48)  # tiles of another width


@pytest.mark.skipif(not kernels.amx_available(), reason="CPU or OS without AMX")
def test_linear_amx_float_out_equals_widening_afterwards():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(100, 70, generator=g).bfloat16()
    x = torch.randn(19, 70, generator=g).bfloat16()
    b = torch.randn(100, generator=g).bfloat16()
    tiles = kernels.amx_pack(w)
    for bias in (None, b):
        out = kernels.linear_amx(x, tiles, 100, bias, float_out=True)
        assert out.dtype == torch.float32 and torch.equal(out, kernels.linear_amx(x, tiles, 100, bias).float())


@pytest.mark.skipif(not (kernels.linear_bf16_available() and kernels.attention_available(64)),
                    reason="CPU without AVX512-BF16")
@pytest.mark.parametrize("deterministic", [False, True])
def test_one_call_per_layer_gives_the_bits_of_fused_layer(tmp_path, smol_tokenizer_dir, monkeypatch, deterministic):
    """`kernels.decoder_layer` (one C call per layer) against `fused_layer` (the kernels called from Python): the
    same tokens and log-prob bits, for batch 1 (AVX512-BF16 linears), small batches (AMX) and speculative verify
    passes."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from tiny_models import make_tiny_checkpoint

    import tlt
    from tlt.engine.models.decoder import DecoderLM
    from tlt.engine.spec.drafter import EagleDrafter

    path = make_tiny_checkpoint(tmp_path / "m", "llama", smol_tokenizer_dir, seed=4, hidden_size=512,
                                intermediate_size=1024, num_attention_heads=8, head_dim=64)
    kw = dict(dtype="bfloat16", random_seed=0, enable_deterministic_inference=deterministic)
    e = tlt.Engine(path, **kw)
    EagleDrafter.random(e.model_config, seed=1, draft_vocab_size=4096).save(str(tmp_path / "d"))
    e.shutdown()
    sp = {"temperature": 0.8, "sampling_seed": 3, "max_new_tokens": 12, "ignore_eos": True}
    prompts = [list(range(100, 130)), list(range(300, 310)), list(range(700, 745))]
    calls = []
    real_plan = DecoderLM._c_layer_plan

    def counting_plan(self, *a):
        plan = real_plan(self, *a)
        calls.append(plan)
        return plan

    def run(plan_fn, **extra):
        monkeypatch.setattr(DecoderLM, "_c_layer_plan", plan_fn)
        eng = tlt.Engine(path, **kw, **extra)
        outs = [eng.generate(input_ids=[prompts[0]], sampling_params=sp, return_logprob=True)[0]]
        outs += eng.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
        eng.shutdown()
        return [(o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]) for o in outs]

    spec = dict(speculative_draft_model_path=str(tmp_path / "d"), speculative_num_steps=2, speculative_eagle_topk=2,
                speculative_num_draft_tokens=4)
    for extra in ({}, spec):
        calls.clear()
        fast = run(counting_plan, **extra)
        modes = {p[0] for p in calls if p is not None}
        # deterministic: AMX for every row count; verify passes of one sequence have 4 rows: AMX
        assert modes == ({1} if extra or deterministic else {0, 1}), calls
        assert fast == run(lambda self, *a: None, **extra)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kv_move_equals_torch_indexing(dtype):
    g = torch.Generator().manual_seed(0)
    caches = [torch.randn(3, 2, 20, 8, generator=g).to(dtype) for _ in range(4)]
    ref = [c.clone() for c in caches]
    rows, dst, src = torch.tensor([0, 0, 2, 1]), torch.tensor([5, 6, 9, 3]), torch.tensor([7, 9, 12, 3])
    for c in ref:
        c[rows, :, dst] = c[rows, :, src]
    kernels.kv_move(caches, rows, dst, src)
    assert all(torch.equal(a, b) for a, b in zip(caches, ref))
    with pytest.raises(IndexError):
        kernels.kv_move(caches, rows, dst, torch.tensor([7, 9, 20, 3]))  # a slot past the cache
    with pytest.raises(ValueError):
        kernels.kv_move(caches + [torch.zeros(3, 2, 21, 8, dtype=dtype)], rows, dst, src)
