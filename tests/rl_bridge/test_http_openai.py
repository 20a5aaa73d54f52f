"""The OpenAI-compatible API through the official `openai` SDK: completions and chat, streaming or not."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_proc import launch
from transformers import AutoTokenizer

MODEL = "tiny-llama"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    s = launch(tiny_llama, tmp_path_factory.mktemp("openai"), "--served-model-name", MODEL)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def _native(server, payload) -> dict:
    r = httpx.post(server.url + "/generate", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_matches_native_generate(server, client, tokenizer):
    prompt = "Once upon a time"
    c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    choice = c.choices[0]
    native = _native(server, {"text": prompt, "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
    assert choice.text == native["text"] and choice.finish_reason == "length"
    assert c.usage.completion_tokens == 6 and c.usage.prompt_tokens == len(tokenizer.encode(prompt))
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == choice.text
    for chosen, tops in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(tops) <= 2 and max(tops.values()) == pytest.approx(chosen)  # greedy: the top token


def test_completion_stream_equals_non_stream(client):
    kw = dict(model=MODEL, prompt="The river", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == "length" and set(finals[:-1]) <= {None}
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def test_completion_batch_token_prompts_and_echo(client, tokenizer):
    c = client.completions.create(model=MODEL, prompt=["red", "green"], max_tokens=3, n=2, temperature=1.0)
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    assert c.usage.completion_tokens == 12
    ids = tokenizer.encode("blue sky")
    e = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, echo=True, logprobs=1, temperature=0)
    ch = e.choices[0]
    assert ch.text.startswith(tokenizer.decode(ids))
    assert len(ch.logprobs.tokens) == len(ids) + 3 and ch.logprobs.token_logprobs[0] is None


def test_chat_uses_the_tokenizer_template(server, client, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert r.usage.prompt_tokens == len(ids)
    native = _native(server, {"input_ids": ids, "sampling_params": {"max_new_tokens": 5, "temperature": 0}})
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == native["text"]
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, logprobs=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    lps = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert sum(len(lp.content) for lp in lps) == 6
    assert chunks[-1].usage.completion_tokens == 6


def test_chat_sglang_extensions_and_multi_sample(client):
    # SGLang's extra sampling fields go through the SDK's extra_body
    extra = {"top_k": 5, "min_tokens": 4, "repetition_penalty": 1.1}
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=3, seed=7,
                                       extra_body=extra)
    assert len(r.choices) == 3 and r.usage.completion_tokens == 12
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=3, seed=7,
                                           extra_body=extra)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded


def test_openai_errors_are_4xx(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="text content"):
        client.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.completions.create(model=MODEL, prompt=["a", "b"], stream=True)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-2)
    assert client.completions.create(model=MODEL, prompt="still serving", max_tokens=1).choices


def test_completion_scores_a_prompt(client, tokenizer):
    # echo + max_tokens=0 + logprobs: the log-probabilities of the prompt itself (evaluation harnesses)
    ids = tokenizer.encode("the quick brown fox")
    c = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = c.choices[0].logprobs
    assert c.usage.completion_tokens == 0 and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)
    assert chat.usage.completion_tokens == 0 and chat.choices[0].message.content == ""
