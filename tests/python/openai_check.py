"""Drives shardserve's OpenAI-compatible API with the official `openai` package.

Usage: openai_check.py BASE_URL CHAT_MODEL PLAIN_MODEL REFERENCE_JSON CHAT_JSON

CHAT_MODEL has the Qwen3 chat template; PLAIN_MODEL is the same checkpoint without one.
Raises (exit status 1) at the first thing that differs from what a client expects.
"""

import json
import sys

import openai

base, chat_model, plain_model, reference_path, chat_path = sys.argv[1:6]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
cases = json.load(open(reference_path))["cases"]
chat_cases = json.load(open(chat_path))["cases"]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def expect_error(call, status, *words):
    try:
        call()
    except openai.APIStatusError as e:
        check(e.status_code == status, f"status {e.status_code}, expected {status}: {e}")
        body = e.response.json()
        check(set(body["error"]) >= {"message", "type", "param", "code"}, f"error shape: {body}")
        for w in words:
            check(w in body["error"]["message"], f"{w!r} not in {body['error']['message']!r}")
        return body["error"]
    raise AssertionError(f"no error (expected {status})")


# Models.
ids = sorted(m.id for m in client.models.list().data)
check(ids == sorted([chat_model, plain_model]), f"models: {ids}")

# Completions: transformers' greedy text, usage and finish_reason.
for case in cases[:4]:
    r = client.completions.create(model=plain_model, prompt=case["prompt"], max_tokens=32, temperature=0)
    c = r.choices[0]
    check(c.text == case["text"], f"completion of {case['prompt']!r}: {c.text!r} != {case['text']!r}")
    check(c.finish_reason == "length", c.finish_reason)
    check(r.usage.prompt_tokens == len(case["input_ids"]) and r.usage.completion_tokens == 32, r.usage)
    check(r.usage.total_tokens == r.usage.prompt_tokens + 32, r.usage)
    check(r.object == "text_completion" and r.model == plain_model, r)

# Streaming: the same text, chunk by chunk, usage in a last chunk without choices.
case = cases[0]
chunks = list(client.completions.create(model=plain_model, prompt=case["prompt"], max_tokens=32, temperature=0,
                                        stream=True, stream_options={"include_usage": True}))
check(len(chunks) > 2, f"{len(chunks)} chunks")
text = "".join(c.choices[0].text for c in chunks if c.choices)
check(text == case["text"], f"streamed {text!r}")
check(chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32, chunks[-1])
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check(finishes == ["length"], finishes)

# Stop strings: the text ends before the first of them.
stop = case["text"][10:14]
r = client.completions.create(model=plain_model, prompt=case["prompt"], max_tokens=32, temperature=0, stop=[stop, "\x00never"])
check(r.choices[0].text == case["text"][: case["text"].index(stop)], r.choices[0].text)
check(r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)

# n sequences of one prompt with a seed: n choices, the same again for the same seed, the
# first the same as n=1 with that seed.
kw = dict(model=plain_model, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
a = client.completions.create(n=3, **kw)
b = client.completions.create(n=3, **kw)
one = client.completions.create(n=1, **kw)
texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
check([c.index for c in sorted(a.choices, key=lambda c: c.index)] == [0, 1, 2], a.choices)
check(texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)], "seeded n=3 differs between two runs")
check(len(set(texts)) > 1, f"the 3 sampled choices are all equal: {texts}")
check(one.choices[0].text == texts[0], "n=1 differs from choice 0 of n=3 with the same seed")
check(a.usage.completion_tokens == 48, a.usage)
streamed = {}
for c in client.completions.create(n=3, stream=True, **kw):
    for ch in c.choices:
        streamed[ch.index] = streamed.get(ch.index, "") + ch.text
check([streamed[i] for i in range(3)] == texts, f"streamed n=3 {streamed} != {texts}")

# Log-probabilities of each generated token, and the most likely alternatives: greedy picks the
# most likely, so its log-probability is the top one's.
r = client.completions.create(model=plain_model, prompt=case["prompt"], max_tokens=8, temperature=0, logprobs=0)
lp = r.choices[0].logprobs
check(len(lp.token_logprobs) == 8 and all(x <= 0 for x in lp.token_logprobs), lp)
r = client.completions.create(model=plain_model, prompt=case["prompt"], max_tokens=4, temperature=0, logprobs=3)
lp = r.choices[0].logprobs
check(len(lp.top_logprobs) == 4 and all(1 <= len(t) <= 3 for t in lp.top_logprobs), lp)
check(all(abs(max(t.values()) - x) < 1e-5 for t, x in zip(lp.top_logprobs, lp.token_logprobs)), lp)
r = client.chat.completions.create(model=chat_model, messages=chat_cases[0]["messages"], max_completion_tokens=3,
                                   temperature=0, logprobs=True, top_logprobs=2)
content = r.choices[0].logprobs.content
check(len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content), content)
check(all(abs(c.top_logprobs[0].logprob - c.logprob) < 1e-5 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content), content)

# min_tokens: this prompt's greedy continuation is the end-of-sequence token at once; with
# min_tokens it cannot be before the fifth token.
r = client.completions.create(model=plain_model, prompt="<|endoftext|>", max_tokens=8, temperature=0)
check(r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop", r)
r = client.completions.create(model=plain_model, prompt="<|endoftext|>", max_tokens=8, temperature=0, extra_body={"min_tokens": 5})
check(r.usage.completion_tokens >= 5, r.usage)
expect_error(lambda: client.completions.create(model=plain_model, prompt="x", max_tokens=4, extra_body={"min_tokens": 5}), 400, "min_tokens")
expect_error(lambda: client.completions.create(model=plain_model, prompt="x", max_tokens=4, logprobs=21), 400, "at most 20")

# Chat: the template's prompt, the same tokens as the completion of the rendered text.
for cc in chat_cases:
    kwargs = cc.get("kwargs") or {}
    extra = {"chat_template_kwargs": kwargs} if kwargs else {}
    r = client.chat.completions.create(model=chat_model, messages=cc["messages"], max_tokens=12, temperature=0,
                                       extra_body=extra)
    ref = client.completions.create(model=chat_model, prompt=cc["text"], max_tokens=12, temperature=0)
    check(r.choices[0].message.content == ref.choices[0].text, f"chat {r.choices[0].message.content!r} != {ref.choices[0].text!r}")
    check(r.choices[0].message.role == "assistant" and r.object == "chat.completion", r)
    check(r.usage.prompt_tokens == len(cc["input_ids"]), f"{r.usage.prompt_tokens} prompt tokens, transformers has {len(cc['input_ids'])}")
    stream = list(client.chat.completions.create(model=chat_model, messages=cc["messages"], max_tokens=12, temperature=0,
                                                 stream=True, extra_body=extra))
    check(stream[0].choices[0].delta.role == "assistant", stream[0])
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    check(content == r.choices[0].message.content, f"streamed chat {content!r}")
    check(all(c.object == "chat.completion.chunk" for c in stream), stream[0])
r = client.chat.completions.create(model=chat_model, messages=chat_cases[0]["messages"], max_completion_tokens=4,
                                   temperature=0, logprobs=True)
check(len(r.choices[0].logprobs.content) == 4, r.choices[0].logprobs)

# Embeddings: one unit vector of the hidden size per input, the same as base64 (the client's
# default) and as floats.
r = client.embeddings.create(model=plain_model, input=["The quick brown fox", "Hello"])
check([d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 64, r.data)
check(abs(sum(x * x for x in r.data[0].embedding) - 1) < 1e-4, "not unit norm")
check(r.usage.prompt_tokens > 0, r.usage)
f = client.embeddings.create(model=plain_model, input=["The quick brown fox", "Hello"], encoding_format="float")
check(all(abs(a - b) < 1e-6 for a, b in zip(f.data[1].embedding, r.data[1].embedding)), "base64 and float differ")

# Errors a client gets: OpenAI's shape, the right status, the field named.
expect_error(lambda: client.completions.create(model=plain_model, prompt="x", max_tokens=4, extra_body={"bogus": 1}), 400, "bogus")
e = expect_error(lambda: client.completions.create(model=plain_model, prompt="x", max_tokens=4, temperature=-1), 400, "temperature")
check(e["param"] == "temperature", e)
expect_error(lambda: client.completions.create(model="no-such-model", prompt="x", max_tokens=4), 404, "no-such-model")
expect_error(lambda: client.completions.create(model=plain_model, prompt="x", max_tokens=100000), 400, "max_tokens")
expect_error(lambda: client.completions.create(model=plain_model, prompt="x", max_tokens=4, logit_bias={"1": 5}), 400, "logit_bias")
expect_error(lambda: client.completions.create(model=plain_model, prompt="x", max_tokens=4, presence_penalty=0.5), 400, "presence_penalty")
expect_error(lambda: client.chat.completions.create(model=plain_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4), 400, "chat template")
expect_error(lambda: client.chat.completions.create(model=chat_model, messages="hi", max_tokens=4), 400, "messages")
print("ok")
