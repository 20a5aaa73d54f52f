"""Tiny random HF checkpoints of each family: fast, exact test targets (importable from any test)."""

from __future__ import annotations

import os

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


def make_tiny_checkpoint(path, family: str, tokenizer_dir: str, seed: int = 0, vocab_size: int = 49152,
                         **overrides) -> str:
    """Write a random HF checkpoint (config.json + model.safetensors + tokenizer) of `family` to `path`."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2, **overrides)
    if family == "llama3":
        kw.setdefault("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        family = "llama"
    if family == "qwen3":
        kw.setdefault("head_dim", 32)
    kw.setdefault("tie_word_embeddings", family == "llama")
    cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so that every weight matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(2.0)  # sharper distributions: fewer near-ties in greedy comparisons
    model.save_pretrained(str(path), safe_serialization=True)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(str(path), f))
    return str(path)
