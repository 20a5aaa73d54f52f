"""Shared fixtures: tiny random HF checkpoints of each family (fast, exact), and the real model (slow)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import make_tiny_checkpoint  # noqa: E402  (tests/ is on sys.path for conftest)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer (from the embedded GGUF), saved as an HF tokenizer folder."""
    from tlt.engine.models.gguf_file import gguf_tokenizer
    from tlt.engine.models.weights import default_model_path

    tok = gguf_tokenizer(default_model_path())
    d = tmp_path_factory.mktemp("smol_tok")
    tok.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smol_tokenizer_dir):
    """{family: checkpoint dir} for llama (tied), llama3 (rope scaling), qwen2 (qkv bias), qwen3 (qk norm)."""
    out = {}
    for fam in ("llama", "llama3", "qwen2", "qwen3"):
        out[fam] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{fam}"), fam, smol_tokenizer_dir)
    return out


@pytest.fixture(scope="session")
def smol_engine():
    """The real SmolLM2-135M engine in float32 (loaded once per session)."""
    import tlt

    eng = tlt.Engine(dtype="float32", random_seed=0)
    yield eng
    eng.shutdown()
