"""Structured output through shardserve's OpenAI-compatible API, checked with the official
`openai` package and `jsonschema`.

Usage:
  structured_check.py schemas BASE_URL MODEL   20 JSON schemas of different shapes: every
                                               response that ends with "stop" validates
  structured_check.py tools BASE_URL MODEL     tool_choice "required" and named: parsed calls
                                               whose arguments validate, streamed == whole

Prints one line of JSON (what it counted) and exits 0, or raises at the first failure.
"""

import json
import sys

import jsonschema
import openai

mode, base, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


S = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1}}, "required": ["x"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 5}, "note": S},
     "required": ["id"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 2}}, "required": ["tags"]},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "boolean"}}, "required": ["c"], "additionalProperties": False}}, "required": ["b"],
        "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0, "maximum": 10}},
     "required": ["kind", "r"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 3}, {"enum": ["none"]}]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"]},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"enum": ["p", "q"]}, "v": {
        "type": "integer", "minimum": 0, "maximum": 9}}, "required": ["k", "v"], "additionalProperties": False},
     "maxItems": 2},
    {"type": "object", "properties": {"first": S, "last": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["first", "age"], "additionalProperties": False},
    {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
]
assert len(SCHEMAS) == 20


def schemas():
    stopped = 0
    for i, schema in enumerate(SCHEMAS):
        jsonschema.Draft202012Validator.check_schema(schema)
        for seed in range(2):
            r = client.completions.create(
                model=model, prompt=f"JSON number {i}:", max_tokens=120, temperature=1.0, seed=seed,
                extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}})
            c = r.choices[0]
            if c.finish_reason != "stop":
                check(c.finish_reason == "length", f"schema {i}: finish_reason {c.finish_reason}")
                continue
            stopped += 1
            try:
                value = json.loads(c.text)
            except ValueError as e:
                raise AssertionError(f"schema {i}, seed {seed}: {c.text!r} is not JSON: {e}")
            try:
                jsonschema.validate(value, schema)
            except jsonschema.ValidationError as e:
                raise AssertionError(f"schema {i}, seed {seed}: {c.text!r} does not validate: {e.message}")
    # A feature llguidance lacks is named in a 400.
    try:
        client.completions.create(model=model, prompt="x", max_tokens=4, extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": {
                "type": "array", "uniqueItems": True}}}})
        raise AssertionError("uniqueItems was accepted")
    except openai.BadRequestError as e:
        body = e.response.json()["error"]
        check("uniqueItems" in body["message"] and body["param"] == "response_format", body)
    return {"responses": 2 * len(SCHEMAS), "stopped": stopped}


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def streamed(**kw):
    calls, content, finish = {}, "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.index not in calls:
                check(tc.id and tc.function.name, f"a call's first delta has its id and name: {tc}")
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                check(tc.id is None and tc.function.name is None, f"id and name come once: {tc}")
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, finish


def tools():
    made, ended = 0, []
    # Required with one call at most (a random model chains calls until max_tokens otherwise),
    # and named.
    for choice in ["required", {"type": "function", "function": {"name": "get_time"}}]:
        for seed in range(4):
            kw = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=150,
                      temperature=1.0, seed=seed, parallel_tool_calls=False, extra_body=NO_THINKING)
            r = client.chat.completions.create(**kw)
            c = r.choices[0]
            ended.append([c.finish_reason, r.usage.completion_tokens])
            if c.finish_reason == "length":
                continue
            check(c.finish_reason == "tool_calls", f"{choice}: finish_reason {c.finish_reason}: {c.message}")
            calls = c.message.tool_calls
            check(calls and not c.message.content, f"{choice}: {c.message}")
            check(len(calls) == 1, f"{choice}: one call, not {calls}")
            if isinstance(choice, dict):
                check(calls[0].function.name == "get_time", f"named: {calls}")
            for call in calls:
                check(call.type == "function" and call.id.startswith("call_"), call)
                jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
            made += 1
            whole = [{"name": x.function.name, "arguments": x.function.arguments} for x in calls]
            s_calls, s_content, s_finish = streamed(**kw)
            check([{"name": x["name"], "arguments": x["arguments"]} for x in s_calls] == whole,
                  f"streamed {s_calls} != whole {whole}")
            check(s_finish == "tool_calls" and not s_content, f"streamed finish {s_finish}, content {s_content!r}")
    # A named function the request does not offer.
    try:
        client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
        raise AssertionError("an unknown named function was accepted")
    except openai.BadRequestError as e:
        body = e.response.json()["error"]
        check("nope" in body["message"] and body["param"] == "tool_choice", body)
    return {"responses": 8, "calls_made": made, "ended": ended}


print(json.dumps(schemas() if mode == "schemas" else tools()))
