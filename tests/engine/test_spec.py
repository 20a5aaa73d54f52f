"""Speculative decoding is lossless: token-identical greedy and seeded outputs, target logprobs, and
exactly the target's distribution for unseeded sampling (chi-square), chain and tree."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import make_tiny_checkpoint

import tlt
from tlt.engine import kernels
from tlt.engine.models.decoder import batch_invariant_supported
from tlt.engine.spec.drafter import EagleDrafter
from tlt.engine.spec.tree import DraftTree, ancestor_matrix, select_tree, tree_attention_mask

CONFIGS = [(3, 1, None), (4, 2, 6), (3, 3, 10)]  # (steps, topk, num_draft_tokens): chain and trees
PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 200, 300], [1000] * 20, [7]]


@pytest.fixture(scope="module")
def target_dir(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def drafter_dir(target_dir, tmp_path_factory):
    base = tlt.Engine(target_dir, dtype="float32")
    d = str(tmp_path_factory.mktemp("drafter"))
    EagleDrafter.random(base.model_config, seed=1, draft_vocab_size=4096).save(d)
    base.shutdown()
    return d


@pytest.fixture(scope="module")
def base_engine(target_dir):
    e = tlt.Engine(target_dir, dtype="float32", random_seed=0)
    yield e
    e.shutdown()


def spec_engine(target_dir, drafter_dir, steps, topk, ndt, **kw):
    return tlt.Engine(target_dir, dtype="float32", random_seed=0, speculative_draft_model_path=drafter_dir,
                      speculative_num_steps=steps, speculative_eagle_topk=topk,
                      speculative_num_draft_tokens=ndt, **kw)


def _lps(out):
    return [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]


@pytest.mark.parametrize("sp", [
    {"temperature": 0},
    {"temperature": 1.0, "sampling_seed": 3},
    {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "sampling_seed": 5, "n": 2},
], ids=["greedy", "seeded-T1", "seeded-topp-topk-n2"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["chain", "tree-k2", "tree-k3"])
def test_random_drafter_token_identical(base_engine, target_dir, drafter_dir, sp, cfg):
    """Acceptance near zero is the hard case: every round discards rejected K/V."""
    sp = dict(sp, max_new_tokens=24, ignore_eos=True)
    ref = base_engine.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    e = spec_engine(target_dir, drafter_dir, *cfg)
    out = e.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
    for a, b in zip(out, ref):
        assert torch.allclose(torch.tensor(_lps(a)), torch.tensor(_lps(b)), atol=1e-4)
        assert a["meta_info"]["spec_verify_ct"] > 0
    e.shutdown()


@pytest.mark.parametrize("draft_dtype", ["auto", "bfloat16", "float32"])
def test_drafter_dtype_beside_a_float32_target(bf16_target_dir, tmp_path, draft_dtype):
    """auto: a bfloat16 drafter, with bfloat16 KV layers of its own, beside the float32 target wherever the bf16
    kernels run (it then serves in a few C calls); a dtype on request. Either way the outputs are plain decoding's
    token for token, and a swapped-in drafter takes the engine's drafter dtype."""
    fast = kernels.linear_bf16_available()
    want = torch.float32 if draft_dtype == "float32" or (draft_dtype == "auto" and not fast) else torch.bfloat16
    base = tlt.Engine(bf16_target_dir, dtype="float32", random_seed=0)
    d = str(tmp_path / "drafter")
    EagleDrafter.random(base.model_config, seed=1, draft_vocab_size=4096).save(d)
    e = spec_engine(bf16_target_dir, d, 3, 2, 5, speculative_draft_dtype=draft_dtype)
    try:
        L = e.model_config.num_layers
        assert e.drafter_dtype == want and e.spec.drafter.fc.weight.dtype == want
        assert e.kv.layer_dtypes == [torch.float32] * L + [want]
        if want == torch.bfloat16 and fast:
            assert e.spec.drafter._c_layers is not None  # the C serving path
        for sp in ({"temperature": 0}, {"temperature": 1.0, "sampling_seed": 3, "n": 2}):
            sp = dict(sp, max_new_tokens=20, ignore_eos=True)
            ref = base.generate(input_ids=PROMPTS, sampling_params=sp)
            out = e.generate(input_ids=PROMPTS, sampling_params=sp)
            assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
        assert e.get_stats()["spec_verify_rounds"] > 0
        e.update_drafter(EagleDrafter.random(e.model_config, seed=2, draft_vocab_size=4096), version="v2")
        assert e.spec.drafter.fc.weight.dtype == want
        out = e.generate(input_ids=PROMPTS[:2], sampling_params={"temperature": 0, "max_new_tokens": 8})
        assert [o["output_ids"] for o in out] == [o["output_ids"] for o in base.generate(
            input_ids=PROMPTS[:2], sampling_params={"temperature": 0, "max_new_tokens": 8})]
    finally:
        e.shutdown()
        base.shutdown()
    with pytest.raises(ValueError, match="speculative_draft_dtype"):
        tlt.Engine(bf16_target_dir, dtype="float32", speculative_draft_model_path=d, speculative_draft_dtype="fp8")


class OracleDraft:
    """Replaces SpecWorker.draft: proposes the reference continuation, corrupted at a random depth, with
    wrong siblings — so rounds accept 0..all draft tokens and the accepted path is not node 1, 2, ..."""

    def __init__(self, worker, refs, steps, topk, seed=0):
        self.worker, self.refs, self.steps, self.topk = worker, refs, steps, topk
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, seqs, root_h, root_logp, cfg, coupling=None):
        k = self.topk
        toks, pars, deps = [], [], []
        for s in seqs:
            ref = self.refs[tuple(s.prompt_ids)][s.sample_index]
            done = len(s.output_ids)
            cont = ref[done: done + self.steps]
            cont += [1] * (self.steps - len(cont))
            bad = int(torch.randint(0, self.steps + 1, (1,), generator=self.g))
            nodes_t, nodes_p, nodes_d = [s.output_ids[-1]], [-1], [0]
            parent = 0
            for d in range(self.steps):
                true_tok = cont[d] if d < bad else (cont[d] + 7) % 4096
                # wrong siblings first, then the (maybe corrupted) main line: the path is not 1, 2, ...
                for j in range(k - 1):
                    nodes_t.append((cont[d] + 11 + j) % 4096)
                    nodes_p.append(parent)
                    nodes_d.append(d + 1)
                nodes_t.append(true_tok)
                nodes_p.append(parent)
                nodes_d.append(d + 1)
                parent = len(nodes_t) - 1
            toks.append(nodes_t)
            pars.append(nodes_p)
            deps.append(nodes_d)
        dev = root_h.device
        return DraftTree(torch.tensor(toks, device=dev), torch.tensor(pars, device=dev),
                         torch.tensor(deps, device=dev))


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("sp", [{"temperature": 0}, {"temperature": 1.0, "sampling_seed": 11, "n": 3}],
                         ids=["greedy", "seeded-n3"])
def test_partial_acceptance_token_identical(base_engine, target_dir, drafter_dir, sp, topk):
    """A drafter that is often right: accepted paths of every length, K/V moved into place."""
    steps = 4
    sp = dict(sp, max_new_tokens=30, ignore_eos=True)
    ref = base_engine.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    n = sp.get("n", 1)
    refs = {tuple(p): [ref[i * n + j]["output_ids"] for j in range(n)] for i, p in enumerate(PROMPTS)}
    e = spec_engine(target_dir, drafter_dir, steps, topk, 1 + steps * topk)
    e.spec.draft = OracleDraft(e.spec, refs, steps, topk)
    out = e.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
    for a, b in zip(out, ref):
        assert torch.allclose(torch.tensor(_lps(a)), torch.tensor(_lps(b)), atol=1e-4)
    hist = [0] * (steps + 1)
    for o in out:
        for i, c in enumerate(o["meta_info"]["spec_accept_histogram"]):
            hist[i] += c
    assert all(c > 0 for c in hist[1:]), hist  # every accept length occurred
    assert e.stats["spec_accepted_tokens"] > 0
    e.shutdown()


def test_requests_join_and_leave(base_engine, target_dir, drafter_dir):
    """Different lengths and a late arrival in one continuous batch, tree config."""
    sps = [{"temperature": 0, "max_new_tokens": m, "ignore_eos": True} for m in (3, 17, 9, 30)]
    ref = base_engine.generate(input_ids=PROMPTS, sampling_params=sps)
    e = spec_engine(target_dir, drafter_dir, 3, 2, 5)
    e.generate(input_ids=PROMPTS[:2], sampling_params=sps[:2])  # warm rows, then a fresh mixed batch
    out = e.generate(input_ids=PROMPTS, sampling_params=sps)
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
    assert e.kv.num_rows == 0
    e.shutdown()


@pytest.mark.parametrize("sp", [{"temperature": 0}, {"temperature": 1.0, "sampling_seed": 7, "n": 2}],
                         ids=["greedy", "seeded-n2"])
@pytest.mark.parametrize("cfg", [(3, 1, None), (4, 2, 6)], ids=["chain", "tree"])
def test_catchup_window_bounds_the_catch_up_and_stays_lossless(base_engine, target_dir, drafter_dir, sp, cfg):
    """speculative_catchup_window=2: each catch-up feeds the drafter at most the 2 newest pending positions of a
    row (a 20-token prompt has 19), the drafter attends from there on; outputs are those of plain decoding."""
    sp = dict(sp, max_new_tokens=24, ignore_eos=True)
    ref = base_engine.generate(input_ids=PROMPTS, sampling_params=sp)
    e = spec_engine(target_dir, drafter_dir, *cfg, speculative_catchup_window=2)
    fed, starts = [], []
    catch_up = e.spec.catch_up

    def spy(seqs):
        out = catch_up(seqs)
        fed.append(max(s.draft_len for s in seqs))  # after the call: positions the drafter has passed
        starts.extend(s.draft_start for s in seqs)
        return out

    forward = e.spec._drafter_forward
    widths = []

    def spy_forward(tokens, *a):
        widths.append(tokens.shape[1])
        return forward(tokens, *a)

    e.spec.catch_up, e.spec._drafter_forward = spy, spy_forward
    out = e.generate(input_ids=PROMPTS, sampling_params=sp)
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
    assert max(widths) <= max(2, cfg[1])  # catch-ups fed <= 2 positions; draft steps topk
    assert max(starts) >= 18  # the 20-token prompt's first 17 pairs were skipped
    e.shutdown()
    with pytest.raises(ValueError, match="catchup_window"):
        spec_engine(target_dir, drafter_dir, *cfg, speculative_catchup_window=0)


def test_penalties_fall_back_exactly(base_engine, target_dir, drafter_dir):
    sp = {"temperature": 0, "max_new_tokens": 20, "repetition_penalty": 1.3, "ignore_eos": True}
    ref = base_engine.generate(input_ids=PROMPTS[:2], sampling_params=sp)
    e = spec_engine(target_dir, drafter_dir, 3, 1, None)
    out = e.generate(input_ids=PROMPTS[:2], sampling_params=sp)
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
    e.shutdown()


@pytest.mark.parametrize("sp", [{"temperature": 0}, {"temperature": 1.0, "sampling_seed": 3, "n": 2}],
                         ids=["greedy", "seeded-n2"])
def test_two_layer_drafter_token_identical(base_engine, target_dir, tmp_path, sp):
    """A deeper drafter keeps one KV layer per decoder layer; outputs stay the target's, tree config."""
    d = str(tmp_path / "two_layers")
    EagleDrafter.random(base_engine.model_config, seed=5, draft_vocab_size=4096, num_layers=2,
                        intermediate_size=96).save(d)
    sp = dict(sp, max_new_tokens=24, ignore_eos=True)
    ref = base_engine.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    e = spec_engine(target_dir, d, 4, 2, 6)
    assert e.kv.num_layers == base_engine.model_config.num_layers + 2
    out = e.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
    for a, b in zip(out, ref):
        assert torch.allclose(torch.tensor(_lps(a)), torch.tensor(_lps(b)), atol=1e-4)
    with pytest.raises(ValueError, match="shape"):  # the cache has two drafter layers, not one
        e.update_drafter(EagleDrafter.random(base_engine.model_config, seed=6, draft_vocab_size=4096))
    e.shutdown()


def test_single_layer_folders_of_the_old_layout_load(base_engine, drafter_dir, tmp_path):
    """Folders written before drafters had several layers ("layer." weights, no num_layers) still load."""
    from safetensors.torch import load_file, save_file

    ref = EagleDrafter.load(drafter_dir, base_engine.model_config)
    old = {("layer." + k[9:] if k.startswith("layers.0.") else k): v
           for k, v in load_file(os.path.join(drafter_dir, "model.safetensors")).items()}
    save_file(old, str(tmp_path / "model.safetensors"))
    with open(os.path.join(drafter_dir, "config.json")) as f:
        meta = {k: v for k, v in json.load(f).items() if k not in ("num_layers", "intermediate_size")}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(meta, f)
    got = EagleDrafter.load(str(tmp_path), base_engine.model_config)
    assert got.cfg.num_layers == 1
    for (k, a), (_, b) in zip(sorted(got.state_dict().items()), sorted(ref.state_dict().items())):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------------------------- trees
@pytest.mark.skipif(not kernels.linear_bf16_available(), reason="CPU without AVX512-BF16")
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 1), (2, 3), (1, 4), (3, 4)])
def test_drafter_serve_is_bit_identical_to_forward(num_layers, B, T):
    """`EagleDrafter.serve` (one C call per layer, norms and head on the kernels) = `forward`, bit for bit: the
    feature, the float32 logits and the K/V it writes, for decode- and tree-shaped passes."""
    from tlt.engine.models.decoder import ATTENTION_KERNEL_T, AttentionBatch
    from tlt.engine.models.model_config import ModelConfig
    from tlt.engine.models.rope import RotaryTable

    mc = ModelConfig(model_type="llama", vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                     rope_scaling=None, tie_word_embeddings=True, attention_bias=False, qk_norm=False,
                     max_position_embeddings=64)
    d = EagleDrafter.random(mc, seed=2, draft_vocab_size=200, num_layers=num_layers).bfloat16().requires_grad_(False)
    d.pack_weights()
    rope = RotaryTable(32, 10000.0, None, 64, "cpu", torch.bfloat16)
    g = torch.Generator().manual_seed(B * 10 + T)
    L, base = 24, torch.tensor([9, 5, 12])[:B]
    emb = (torch.randn(B, T, 128, generator=g) * 0.5).bfloat16()
    feats = torch.randn(B, T, 128, generator=g).bfloat16()
    positions = base.view(B, 1) + torch.tensor([0] + [1] * (T - 1)).view(1, T)  # a root and its children
    slots = base.view(B, 1) + torch.arange(T).view(1, T)
    rows = torch.arange(B).view(B, 1).expand(B, T)
    key = torch.arange(L).view(1, 1, L)
    mask = (key < base.view(B, 1, 1)) | (key == slots.view(B, T, 1)) | ((key == base.view(B, 1, 1))
                                                                        & (torch.arange(T).view(1, T, 1) > 0))
    mask = mask.unsqueeze(1)
    caches = [torch.randn(B, 2, L, 32, generator=g).bfloat16() for _ in range(2 * num_layers)]
    kv = {path: [c.clone() for c in caches] for path in ("forward", "serve")}
    kf, vf = kv["forward"][:num_layers], kv["forward"][num_layers:]
    ks, vs = kv["serve"][:num_layers], kv["serve"][num_layers:]
    with torch.inference_mode():
        cos, sin = rope.lookup(positions)
        h_ref, logits_ref = d(emb, feats, cos, sin, kf, vf, AttentionBatch(0, positions, mask, L, rows, slots))
        out = d.serve(emb, feats, positions, rows, slots, mask, L, ks, vs, rope)
    assert out is not None
    h, logits = out
    assert logits.dtype == torch.float32 and torch.equal(h, h_ref) and torch.equal(logits, logits_ref)
    assert all(torch.equal(a, b) for a, b in zip(kv["forward"], kv["serve"]))
    if 5 * T > ATTENTION_KERNEL_T:  # more queries per sequence than the attention kernel takes: `forward`'s job
        assert d.serve(emb.repeat(1, 5, 1), feats.repeat(1, 5, 1), positions.repeat(1, 5), rows.repeat(1, 5),
                       slots.repeat(1, 5), mask.repeat(1, 1, 5, 1), L, ks, vs, rope) is None


def test_tree_mask_and_selection():
    parent = torch.tensor([[-1, 0, 0, 1, 3]])
    anc = ancestor_matrix(parent)
    assert anc[0, 4].tolist() == [True, True, False, True, True]
    mask = tree_attention_mask(torch.tensor([2]), anc, 7)[0, 0]
    assert mask[0].tolist() == [True, True, True, False, False, False, False]  # root: prefix + itself
    assert mask[2].tolist() == [True, True, True, False, True, False, False]  # node 2: root + itself
    assert mask[4].tolist() == [True, True, True, True, False, True, True]  # node 4: 0, 1, 3, itself
    # selection keeps the tree closed and ranks by cumulative log-probability
    tok = torch.tensor([[10, 11, 12, 13]])
    score = torch.tensor([[-0.1, -2.0, -0.1, -0.3]])  # cand 2 (child of 0) ties its parent: parent first
    par = torch.tensor([[-1, -1, 0, 2]])
    dep = torch.tensor([[1, 1, 2, 3]])
    t = select_tree(tok, score, par, dep, 4)
    assert t.tokens[0, 1:].tolist() == [10, 12, 13]
    assert t.parent[0].tolist() == [-1, 0, 1, 2]


# ---------------------------------------------------------------------------------------------- chi-square
@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory, smol_tokenizer_dir):
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("v16"), "llama", smol_tokenizer_dir, seed=3, vocab_size=16)
    base = tlt.Engine(d, dtype="float32")
    dd = str(tmp_path_factory.mktemp("v16_drafter"))
    EagleDrafter.random(base.model_config, seed=2).save(dd)
    base.shutdown()
    return d, dd


def _exact_joint(model_dir, prompt, sp):
    """P(t1, t2 | prompt) of the target's warped distribution, by enumeration with transformers."""
    from transformers import AutoModelForCausalLM

    from tlt.engine.sampling import build_sampling_batch, scaled_logits, warped_probs
    from tlt.engine.sampling_params import SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    p = SamplingParams.from_any(sp)

    def dist(ids):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[:, -1].float()
        sb = build_sampling_batch([p], logits.shape[-1], "cpu")
        w = warped_probs(scaled_logits(logits, sb), sb)[0]
        return (w / w.sum()).double()

    p1 = dist(prompt)
    V = p1.shape[0]
    joint = torch.zeros(V, V, dtype=torch.float64)
    for a in range(V):
        if p1[a] > 0:
            joint[a] = p1[a] * dist(prompt + [a])
    return joint


@pytest.mark.parametrize("cfg", [(2, 1, None), (2, 3, 7)], ids=["chain", "tree"])
@pytest.mark.parametrize("warp", [{"temperature": 1.0}, {"temperature": 1.0, "top_k": 8, "top_p": 0.9}],
                         ids=["T1", "topk-topp"])
def test_unseeded_sampling_matches_target_distribution(small_vocab, cfg, warp):
    """Chi-square over 20k two-token draws (the second token comes after an accept or a rejection)."""
    from scipy.stats import chisquare

    model_dir, drafter = small_vocab
    prompt = [3, 5, 7]
    sp = dict(warp, max_new_tokens=2, ignore_eos=True, n=1000)
    joint = _exact_joint(model_dir, prompt, warp)
    e = spec_engine(model_dir, drafter, *cfg, max_running_requests=1024)
    steps, topk, _ = cfg
    # A deterministic proposer that is often right: the target's own most likely tokens.
    first = joint.sum(1).topk(topk).indices.tolist()
    second = [int(joint[a].argmax()) for a in first]

    def fixed_tree(seqs, root_h, root_logp, _cfg, coupling=None):
        rows = []
        for s in seqs:
            if len(s.output_ids) == 1:  # drafting the second token: a chain from the first
                rows.append(([s.output_ids[-1], int(joint[s.output_ids[-1]].argmax())], [-1, 0], [0, 1]))
            else:
                toks, par, dep = [s.output_ids[-1]], [-1], [0]
                for a, b in zip(first, second):
                    toks += [a, b]
                    par += [0, len(toks) - 2]
                    dep += [1, 2]
                rows.append((toks[: _cfg.num_draft_tokens], par[: _cfg.num_draft_tokens],
                             dep[: _cfg.num_draft_tokens]))
        width = max(len(r[0]) for r in rows)
        pad = lambda r: (r[0] + [0] * (width - len(r[0])), r[1] + [0] * (width - len(r[1])),  # noqa: E731
                         r[2] + [1] * (width - len(r[2])))
        rows = [pad(r) for r in rows]
        return DraftTree(*(torch.tensor([r[i] for r in rows]) for i in range(3)))

    e.spec.draft = fixed_tree
    counts = torch.zeros(16, 16, dtype=torch.float64)
    for _ in range(20):
        for o in e.generate(input_ids=prompt, sampling_params=sp):
            a, b = o["output_ids"]
            counts[a, b] += 1
    assert e.stats["spec_accepted_tokens"] > 0  # some second tokens came from accepted drafts
    e.shutdown()
    mask = joint > 0
    assert counts[~mask].sum() == 0  # nothing outside the warped support
    obs, exp = counts[mask], joint[mask] * counts.sum()
    # pool rare cells so that expected counts are >= 5
    rare = exp < 5
    obs = torch.cat([obs[~rare], obs[rare].sum().view(1)]) if rare.any() else obs
    exp = torch.cat([exp[~rare], exp[rare].sum().view(1)]) if rare.any() else exp
    exp = exp * obs.sum() / exp.sum()  # float rounding of the enumeration
    p = chisquare(obs.numpy(), exp.numpy()).pvalue
    assert p > 0.01, p




@pytest.mark.parametrize("cfg", [(2, 1, None), (2, 3, 7)], ids=["chain", "tree"])
def test_coupled_drafting_matches_target_distribution(small_vocab, cfg):
    """The real drafter, proposing by Gumbel-max with the round's own noise: the proposals now depend on
    the noise that also draws the emitted tokens. Three tokens per sample (the first from prefill, then a
    round that can accept): the joint of tokens 2 and 3 — where reaching depth 1 depends on the coupled
    draft — must still be the target's."""
    from scipy.stats import chisquare

    model_dir, drafter = small_vocab
    prompt = [3, 5, 7]
    warp = {"temperature": 1.0}
    first = _exact_joint(model_dir, prompt, warp)  # P(t1, t2)
    joint = torch.zeros(16, 16, dtype=torch.float64)  # P(t2, t3) = sum over t1
    for a in range(16):
        if first[a].sum() > 0:
            joint += first[a].sum() * _exact_joint(model_dir, prompt + [a], warp)
    e = spec_engine(model_dir, drafter, *cfg, max_running_requests=1024)
    counts = torch.zeros(16, 16, dtype=torch.float64)
    for _ in range(20):
        for o in e.generate(input_ids=prompt, sampling_params=dict(warp, max_new_tokens=3, ignore_eos=True,
                                                                      n=1000)):
            _, b, c = o["output_ids"]
            counts[b, c] += 1
    assert e.stats["spec_accepted_tokens"] > 2000  # coupling makes a random 16-token drafter often right
    e.shutdown()
    obs, exp = counts.flatten(), joint.flatten() * counts.sum()
    rare = exp < 5
    if rare.any():
        obs = torch.cat([obs[~rare], obs[rare].sum().view(1)])
        exp = torch.cat([exp[~rare], exp[rare].sum().view(1)])
    assert chisquare(obs.numpy(), (exp * obs.sum() / exp.sum()).numpy()).pvalue > 0.01


@pytest.mark.parametrize("seeded", [False, True], ids=["fresh-noise", "sampling_seed"])
def test_coupling_accepts_everything_when_drafter_equals_target(target_dir, drafter_dir, tmp_path, seeded):
    """Target and drafter both uniform over the whole vocabulary (zero final norms, identity d2t): at T=1 a
    drafter that proposes its own argmax would match 1 time in V; the coupled one matches every time."""
    e = spec_engine(target_dir, drafter_dir, 3, 1, None)
    V = e.model_config.vocab_size
    norm = e.get_weights_by_name("model.norm.weight")
    e.update_weights_from_tensor([("model.norm.weight", torch.zeros_like(norm))])
    d = EagleDrafter.random(e.model_config, seed=4)  # draft vocabulary = the whole vocabulary, d2t = identity
    assert d.cfg.draft_vocab_size == V
    with torch.no_grad():
        d.norm.weight.zero_()
    e.update_drafter(d, version="uniform")
    sp = {"temperature": 1.0, "max_new_tokens": 31, "ignore_eos": True, **({"sampling_seed": 9} if seeded else {})}
    out = e.generate(input_ids=PROMPTS[0], sampling_params=sp)
    m = out["meta_info"]
    assert m["spec_accept_token_num"] == 3 * m["spec_verify_ct"], m["spec_accept_histogram"]
    assert len(set(out["output_ids"])) > 20  # and the tokens are random, not a constant
    e.shutdown()


TRAINED_DRAFTER = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "drafters", "smollm2")


@pytest.mark.skipif(not os.path.exists(os.path.join(TRAINED_DRAFTER, "config.json")),
                    reason="the trained SmolLM2 drafter (benchmarks/drafters/smollm2) is not in this checkout")
@pytest.mark.parametrize("cfg", [(4, 1, None), (4, 2, 8)], ids=["chain-s4", "tree-s4k2n8"])
def test_smollm2_with_its_trained_drafter_is_token_identical(smol_engine, cfg):
    """The real target with the drafter that accepts most (float32): greedy and seeded top-p outputs and
    their logprobs equal plain decoding's, in a batch of mixed prompt lengths."""
    tok = smol_engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                  add_generation_prompt=True))
               for q in ("Explain why the sky is blue.", "Ann has 12 apples and gets 7 more. How many now?",
                         "Write a haiku about autumn leaves falling on a quiet pond at dusk.")]
    sps = [{"temperature": 0, "max_new_tokens": 40},
           {"temperature": 1.0, "top_p": 0.95, "sampling_seed": 11, "max_new_tokens": 40}]
    e = tlt.Engine(dtype="float32", random_seed=0, speculative_draft_model_path=TRAINED_DRAFTER,
                   speculative_num_steps=cfg[0], speculative_eagle_topk=cfg[1], speculative_num_draft_tokens=cfg[2])
    try:
        for sp in sps:
            want = smol_engine.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
            got = e.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
            for w, g in zip(want, got):
                assert g["output_ids"] == w["output_ids"]
                assert torch.allclose(torch.tensor(_lps(g)), torch.tensor(_lps(w)), atol=1e-4)
        st = e.get_stats()
        assert st["spec_accepted_tokens"] / st["spec_verify_rounds"] > 0.5  # the drafter is really accepted
    finally:
        e.shutdown()


@pytest.fixture(scope="module")
def bf16_target_dir(tmp_path_factory, smol_tokenizer_dir):
    """A tiny llama whose head size the attention kernel takes (32), for bfloat16 runs."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama_hd32"), "llama", smol_tokenizer_dir, seed=4,
                                hidden_size=512, intermediate_size=1024, num_attention_heads=8, head_dim=64)


@pytest.mark.skipif(not batch_invariant_supported(torch.bfloat16, torch.device("cpu"), 32),
                    reason="batch-invariant bf16 kernels need AVX512-BF16 and the C kernels")
@pytest.mark.parametrize("sp", [{"temperature": 0}, {"temperature": 1.0, "sampling_seed": 11, "n": 3}],
                         ids=["greedy", "seeded-n3"])
@pytest.mark.parametrize("topk", [1, 2])
def test_bf16_deterministic_inference_token_and_bit_identical(bf16_target_dir, tmp_path, sp, topk):
    """enable_deterministic_inference: in bfloat16, speculative decoding (accepted paths of every length, tree
    nodes away from their decode-time slots) emits the tokens and the very logprob bits of plain decoding.
    Without it the same run need not (different kernels by row count, SDPA)."""
    steps = 4
    sp = dict(sp, max_new_tokens=30, ignore_eos=True)
    kw = dict(dtype="bfloat16", random_seed=0, enable_deterministic_inference=True)
    base = tlt.Engine(bf16_target_dir, **kw)
    assert base.model.batch_invariant and base.model.head_packed is None
    ref = base.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    n = sp.get("n", 1)
    refs = {tuple(p): [ref[i * n + j]["output_ids"] for j in range(n)] for i, p in enumerate(PROMPTS)}
    d = str(tmp_path / "drafter")
    EagleDrafter.random(base.model_config, seed=1, draft_vocab_size=4096).save(d)
    e = tlt.Engine(bf16_target_dir, speculative_draft_model_path=d, speculative_num_steps=steps,
                   speculative_eagle_topk=topk, speculative_num_draft_tokens=1 + steps * topk, **kw)
    e.spec.draft = OracleDraft(e.spec, refs, steps, topk)
    out = e.generate(input_ids=PROMPTS, sampling_params=sp, return_logprob=True)
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in ref]
    assert [_lps(o) for o in out] == [_lps(o) for o in ref]
    hist = [sum(c) for c in zip(*(o["meta_info"]["spec_accept_histogram"] for o in out))]
    assert all(c > 0 for c in hist[1:]), hist
    e.shutdown()
    base.shutdown()


@pytest.mark.skipif(not batch_invariant_supported(torch.bfloat16, torch.device("cpu"), 64),
                    reason="batch-invariant bf16 kernels need AVX512-BF16 and the C kernels")
def test_bf16_deterministic_request_does_not_depend_on_its_batch(bf16_target_dir):
    """A request alone, and padded into a prefill and a decode batch with a longer and a shorter prompt: the same
    tokens and log-prob bits with the flag (prefill attention included)."""
    e = tlt.Engine(bf16_target_dir, dtype="bfloat16", random_seed=0, enable_deterministic_inference=True)
    sp = {"temperature": 0.9, "sampling_seed": 2, "max_new_tokens": 20, "ignore_eos": True}
    a = list(range(100, 137))
    alone = e.generate(input_ids=[a], sampling_params=sp, return_logprob=True)[0]
    batched = e.generate(input_ids=[list(range(500, 700)), a, list(range(900, 910))], sampling_params=sp,
                         return_logprob=True)[1]
    assert batched["output_ids"] == alone["output_ids"]
    assert _lps(batched) == _lps(alone)
    e.shutdown()


def test_deterministic_inference_is_refused_where_it_cannot_hold(target_dir):
    with pytest.raises(ValueError, match="enable_deterministic_inference"):
        tlt.Engine(target_dir, dtype="float32", enable_deterministic_inference=True)
    with pytest.raises(ValueError, match="enable_deterministic_inference"):  # head size 16: no attention kernel
        tlt.Engine(target_dir, dtype="bfloat16", enable_deterministic_inference=True)
