//! Chat templates against the references: transformers' own output for the Qwen3 fixture, and
//! jinja2 set up exactly as transformers sets it up (`_compile_jinja_template`) on conversations
//! with tools, tool calls and results, several system messages, reasoning and non-ASCII text.
//!
//! The jinja2 side runs in a virtual environment at `target/chat-venv`, made (with `pip install
//! jinja2`) the first time it is missing.

use serde_json::{json, Value};
use shardserve::chat::{prompt_ids, ChatError, ChatInput, ChatTemplates};
use shardserve::tokenizer::Tokenizer;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    match std::env::var_os("SHARDSERVE_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"),
    }
}

fn qwen3_template() -> String {
    std::fs::read_to_string(fixtures().join("chat/qwen3.jinja")).expect("reading chat/qwen3.jinja")
}

/// tiny-qwen3 with qwen3.jinja as its `chat_template.jinja`: the model the fixture was made with.
fn tiny_qwen3_with_template() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("hf-reference/tiny-qwen3");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("chat_template.jinja"), qwen3_template()).unwrap();
    dir
}

#[test]
fn qwen3_fixture_matches_transformers_text_and_ids() {
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("chat/public.json")).unwrap()).unwrap();
    let dir = tiny_qwen3_with_template();
    let templates = ChatTemplates::load(dir.path(), "tiny-qwen3").unwrap();
    let tokenizer = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for (i, case) in cases.iter().enumerate() {
        let input = ChatInput {
            tools: case.get("tools"),
            add_generation_prompt: true,
            chat_template_kwargs: case.get("kwargs").and_then(Value::as_object),
            ..ChatInput::new(&case["messages"])
        };
        let text = templates.render(&input).unwrap_or_else(|e| panic!("case {i}: {e}"));
        assert_eq!(text, case["text"].as_str().unwrap(), "case {i}: text");
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(prompt_ids(&tokenizer, &text).unwrap(), ids, "case {i}: input ids");
    }
}

/// transformers' jinja2 environment, as `_compile_jinja_template` builds it, rendering each
/// case as `apply_chat_template` does: `messages`, `tools`, `documents=None`,
/// `add_generation_prompt`, then the special tokens overridden by the kwargs.
const JINJA2_REFERENCE: &str = r#"
import json, sys
from datetime import datetime
import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

class Generation(Extension):
    # transformers' AssistantTracker renders {% generation %} bodies unchanged.
    tags = {"generation"}
    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)
    def _body(self, caller):
        return caller()

def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

def strftime_now(format):
    return datetime.now().strftime(format)

env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = strftime_now

out = []
for case in json.loads(sys.stdin.buffer.read().decode("utf-8")):
    try:
        template = env.from_string(case["template"])
    except jinja2.exceptions.TemplateSyntaxError as e:
        out.append({"error": "syntax", "message": str(e)})
        continue
    try:
        text = template.render(messages=case["messages"], tools=case["tools"], documents=None,
                               add_generation_prompt=case["add_generation_prompt"],
                               **{**case["special_tokens"], **case["kwargs"]})
        out.append({"text": text})
    except Exception as e:
        raised = type(e) is jinja2.exceptions.TemplateError
        out.append({"error": "raised" if raised else "render", "message": str(e)})
sys.stdout.write(json.dumps(out))
"#;

/// Runs `cmd` to completion within `limit`, killing it past that; panics with its output on
/// failure.
fn run_bounded(mut cmd: Command, stdin: &[u8], limit: Duration, what: &str) -> Vec<u8> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&stdin));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        stdout.read_to_end(&mut b).map(|_| b)
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        stderr.read_to_end(&mut b).map(|_| b)
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: {cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    let out = out.join().unwrap().unwrap_or_default();
    let err = err.join().unwrap().unwrap_or_default();
    assert!(status.success(), "{what}: {cmd:?} failed ({status}):\n{}\n{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    out
}

/// The Python of `target/chat-venv`, made with jinja2 when missing. It is built under a name
/// of its own and renamed into place, so concurrent test processes never see half of one (and
/// the tests of this one share one attempt).
fn reference_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(make_reference_python).clone()
}

fn make_reference_python() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    };
    let venv = target.join("chat-venv");
    let python = venv.join("bin/python");
    if python.exists() {
        return python;
    }
    std::fs::create_dir_all(&target).unwrap();
    let building = target.join(format!("chat-venv.building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    let mut venv_cmd = Command::new("python3");
    venv_cmd.args(["-m", "venv"]).arg(&building);
    run_bounded(venv_cmd, b"", Duration::from_secs(120), "making the jinja2 reference's virtual environment");
    let mut pip = Command::new(building.join("bin/python"));
    pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "jinja2==3.1.6"]);
    run_bounded(pip, b"", Duration::from_secs(300), "installing jinja2 from PyPI");
    // Only pip's own scripts name the folder; the interpreter finds its packages through the
    // pyvenv.cfg beside it, so the renamed environment works.
    if std::fs::rename(&building, &venv).is_err() {
        // Another test process finished first.
        let _ = std::fs::remove_dir_all(&building);
    }
    assert!(python.exists(), "no interpreter at {}", python.display());
    python
}

/// One rendering to compare.
struct Case {
    label: String,
    template: String,
    messages: Value,
    tools: Option<Value>,
    add_generation_prompt: bool,
    kwargs: Value,
}

/// What a renderer made of a case: the text, or the kind of failure (with the message when
/// the template raised it, which both must then agree on).
#[derive(Debug, PartialEq)]
enum Outcome {
    Text(String),
    Raised(String),
    Failed(&'static str),
}

fn ours(case: &Case, special_tokens: &std::collections::BTreeMap<String, String>) -> Outcome {
    let templates = ChatTemplates::from_sources("test", [("default".into(), case.template.clone())], special_tokens.clone());
    let input = ChatInput {
        tools: case.tools.as_ref(),
        add_generation_prompt: case.add_generation_prompt,
        chat_template_kwargs: case.kwargs.as_object(),
        ..ChatInput::new(&case.messages)
    };
    match templates.render(&input) {
        Ok(text) => Outcome::Text(text),
        Err(ChatError::Raised { message, .. }) => Outcome::Raised(message),
        Err(ChatError::Syntax { .. }) => Outcome::Failed("syntax"),
        Err(ChatError::Render { .. }) => Outcome::Failed("render"),
        Err(e) => panic!("{}: unexpected error {e}", case.label),
    }
}

/// Renders every case with jinja2 and with us; panics listing every difference, else returns
/// the outcomes.
fn compare(cases: &[Case], special_tokens: &std::collections::BTreeMap<String, String>) -> Vec<Outcome> {
    let python = reference_python();
    let request: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({"template": c.template, "messages": c.messages, "tools": c.tools,
                   "add_generation_prompt": c.add_generation_prompt, "kwargs": c.kwargs,
                   "special_tokens": special_tokens})
        })
        .collect();
    let mut cmd = Command::new(&python);
    cmd.args(["-c", JINJA2_REFERENCE]);
    let out = run_bounded(cmd, &serde_json::to_vec(&request).unwrap(), Duration::from_secs(120), "rendering with jinja2");
    let theirs: Vec<Value> = serde_json::from_slice(&out).expect("the reference prints JSON");
    assert_eq!(theirs.len(), cases.len());
    let mut differences = Vec::new();
    let mut outcomes = Vec::new();
    for (case, reference) in cases.iter().zip(&theirs) {
        let want = match (reference.get("text"), reference["error"].as_str()) {
            (Some(t), _) => Outcome::Text(t.as_str().unwrap().to_string()),
            (_, Some("raised")) => Outcome::Raised(reference["message"].as_str().unwrap().to_string()),
            (_, Some("syntax")) => Outcome::Failed("syntax"),
            _ => Outcome::Failed("render"),
        };
        let got = ours(case, special_tokens);
        if got != want {
            differences.push(format!(
                "{}:\n  jinja2: {want:?}{}\n  ours:   {got:?}",
                case.label,
                reference.get("message").map(|m| format!(" ({m})")).unwrap_or_default()
            ));
        }
        outcomes.push(got);
    }
    assert!(differences.is_empty(), "{} of {} renderings differ from jinja2:\n{}", differences.len(), cases.len(), differences.join("\n"));
    outcomes
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Météo actuelle — 天气 ☀️",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "城市名, e.g. \"北京\""},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "default": 1.0}},
                "required": ["city"]}}},
        {"type": "function", "function": {
            "name": "search",
            "description": "Search the web for <tags> & 'quotes'\nover two lines",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
    ])
}

/// Conversations of every shape the issue names.
fn conversations() -> Vec<(&'static str, Value, bool)> {
    vec![
        (
            "tool calls with object arguments and two results",
            json!([
                {"role": "system", "content": "You are a helpful assistant. 你好!"},
                {"role": "user", "content": "北京和巴黎的天气怎么样? 🌦️"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京", "days": 2, "unit": "c"}}},
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "opts": {"precise": true, "ratio": 0.5, "tags": []}}}}]},
                {"role": "tool", "content": "{\"temp\": 25.0, \"sky\": \"晴\"}"},
                {"role": "tool", "content": "{\"temp\": 18.5, \"sky\": \"pluie\"}"},
                {"role": "assistant", "content": "北京晴, 25°C; Paris: pluie, 18.5°C ☔"},
                {"role": "user", "content": "Merci 🙏"}
            ]),
            true,
        ),
        (
            "tool call with string arguments, ending on the result",
            json!([
                {"role": "user", "content": "Search for Rust news"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"Rust news\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Rust 2.0 released (not really) — «news»"}
            ]),
            true,
        ),
        (
            "several system messages",
            json!([
                {"role": "system", "content": "First system."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "system", "content": "Now answer in French."},
                {"role": "user", "content": "How are you?"}
            ]),
            false,
        ),
        (
            "reasoning content over a multi-step tool turn",
            json!([
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "reasoning_content": "Simple arithmetic.", "content": "4"},
                {"role": "user", "content": "And the weather in Tokyo?"},
                {"role": "assistant", "reasoning_content": "\nI should call the tool.\n", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "reasoning_content": "The tool says sunny.", "content": "\nIt is sunny in 東京."}
            ]),
            true,
        ),
        (
            "reasoning inline in content",
            json!([
                {"role": "user", "content": "Tell me a joke"},
                {"role": "assistant", "content": "<think>\nSomething short.\n</think>\n\nWhy did the 🦀 cross the road?"},
                {"role": "user", "content": "<tool_response>not really</tool_response>"},
                {"role": "assistant", "content": "<think>odd</think>Done."}
            ]),
            false,
        ),
        ("one plain user message", json!([{"role": "user", "content": "Hello, wörld"}]), false),
        (
            "null content with tool calls",
            json!([
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
            ]),
            true,
        ),
    ]
}

/// Every conversation, with and without a generation prompt and thinking switched each way;
/// tools where the conversation uses them, and once more without.
fn cases_for(template_label: &str, template: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    for (label, messages, with_tools) in conversations() {
        for add_generation_prompt in [true, false] {
            for kwargs in [json!({}), json!({"enable_thinking": false}), json!({"enable_thinking": true})] {
                let tool_choices = if with_tools { vec![Some(tools()), None] } else { vec![None] };
                for tools in tool_choices {
                    cases.push(Case {
                        label: format!(
                            "{template_label} / {label} / gen={add_generation_prompt} kwargs={kwargs} tools={}",
                            tools.is_some()
                        ),
                        template: template.to_string(),
                        messages: messages.clone(),
                        tools: tools.clone(),
                        add_generation_prompt,
                        kwargs: kwargs.clone(),
                    });
                }
            }
        }
    }
    cases
}

#[test]
fn qwen3_template_equals_transformers_jinja2_on_tool_reasoning_and_multilingual_chats() {
    let dir = tiny_qwen3_with_template();
    let special_tokens = ChatTemplates::load(dir.path(), "tiny-qwen3").unwrap().special_tokens().clone();
    let cases = cases_for("qwen3", &qwen3_template());
    let outcomes = compare(&cases, &special_tokens);
    // Only the assistant turn whose content is null fails (Qwen3's template tests
    // `'</think>' in message.content`, which Python refuses for None, and so do we).
    for (case, outcome) in cases.iter().zip(&outcomes) {
        let null_content = case.label.contains("null content");
        assert_eq!(matches!(outcome, Outcome::Text(_)), !null_content, "{}: {outcome:?}", case.label);
    }
}

/// A template of our own that leans on what real templates use beyond Qwen3's: a BOS token,
/// system-message slicing, `tojson` with indent, dict and list printing, filters, tests, loop
/// variables, macros and `raise_exception` for roles it does not know.
const KITCHEN_SINK: &str = r#"{{- bos_token }}
{%- macro render_content(content) -%}
    {%- if content is string -%}{{ content | trim }}
    {%- elif content is none -%}(none)
    {%- else -%}{% for part in content %}{% if part.type == 'text' %}{{ part.text }}{% else %}[{{ part.type }}]{% endif %}{% endfor %}
    {%- endif -%}
{%- endmacro -%}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are a bot." %}
    {%- set loop_messages = messages %}
{%- endif %}
<<SYS>>
{{ system_message }}
{% if tools is not none %}
Functions ({{ tools | length }}):
{{ tools | tojson(indent=4) }}
{% for tool in tools %}
  - {{ tool.function.name }}({{ tool.function.parameters.properties | dictsort | map('first') | join(', ') }}) required={{ tool.function.parameters.required }}
{% endfor %}
{% endif %}
Date: {{ strftime_now("%d %B %Y") }}
<</SYS>>
{% set ns = namespace(tool_turns=0, last_user=-1) %}
{% for m in loop_messages %}
    {%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
{% endfor %}
{% for message in loop_messages %}
{% if message.role not in ['user', 'assistant', 'tool', 'system'] %}
{{ raise_exception("Unknown role: " ~ message.role) }}
{% endif %}
[{{ loop.index }}/{{ loop.length }}{% if loop.first %} first{% endif %}{% if loop.last %} last{% endif %}{% if loop.previtem %} after {{ loop.previtem.role }}{% endif %}] {{ message.role | upper }}{% if loop.index0 > ns.last_user %} (after the last user turn){% endif %}:
{% if message.role == 'assistant' and message.reasoning_content is defined %}
<reasoning>{{ message.reasoning_content.strip() }}</reasoning>
{% endif %}
{{ render_content(message.content) }}
{% for call in message.tool_calls | default([]) %}
{% set ns.tool_turns = ns.tool_turns + 1 %}
    call {{ loop.index }}: {{ call.function.name }} {{ call.function.arguments if call.function.arguments is string else call.function.arguments | tojson(sort_keys=true) }} / {{ call.function.arguments }}
{% endfor %}
{% if message.tool_call_id is defined %}(for {{ message.tool_call_id }}){% endif %}
{{ message.get('name', 'anonymous') }} keys={{ message.keys() | list }} {{ message | length }} {{ message.content.split() | length if message.content is string else 0 }}
{% endfor %}
{{ ns.tool_turns }} tool calls; {{ (messages | selectattr('role', 'equalto', 'user') | list | length) }} user turns; last said {{ (messages | last).content }}
{% if add_generation_prompt %}
{{- '<assistant>' }}{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}
{% endif %}
"#;

#[test]
fn a_kitchen_sink_template_equals_transformers_jinja2() {
    let special_tokens = [("bos_token", "<s>"), ("eos_token", "</s>")].map(|(k, v)| (k.to_string(), v.to_string())).into();
    let mut cases = cases_for("kitchen sink", KITCHEN_SINK);
    cases.push(Case {
        label: "kitchen sink / unknown role".into(),
        template: KITCHEN_SINK.into(),
        messages: json!([{"role": "user", "content": "a"}, {"role": "narrator", "content": [{"type": "text", "text": "b"}, {"type": "image"}]}]),
        tools: None,
        add_generation_prompt: true,
        kwargs: json!({}),
    });
    let outcomes = compare(&cases, &special_tokens);
    let texts = outcomes.iter().filter(|o| matches!(o, Outcome::Text(t) if t.starts_with("<s><<SYS>>"))).count();
    assert_eq!(texts, cases.len() - 1, "every conversation renders");
    assert_eq!(outcomes.last(), Some(&Outcome::Raised("Unknown role: narrator".into())));
}

/// Small templates, each on one feature of jinja2 that templates use, with one context.
#[test]
fn jinja2_features_render_as_jinja2_renders_them() {
    let snippets = [
        // Printing values as Python's str() does.
        "{{ messages[0] }}|{{ messages[2].tool_calls }}|{{ true }} {{ false }} {{ none }}",
        "{{ 1.0 }} {{ 2.5e-7 }} {{ 1e20 }} {{ 0.1 + 0.2 }} {{ 7 / 2 }} {{ 4 / 2 }} {{ 10 // 3 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ 2 ** 10 }}",
        "{{ x | string }}|{{ [1, 'a'] | string }}|{{ 'a' ~ 1 ~ true ~ none }}",
        "{{ nothing }}|{{ nothing | default('d') }}|{% if nothing %}yes{% else %}no{% endif %}|{{ messages[100] }}",
        // Strings.
        "{{ s.upper() }}|{{ s.lower() }}|{{ s.title() }}|{{ s.capitalize() }}|{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}",
        "{{ s.split() }}|{{ s.split(',') }}|{{ s.strip().split(' ', 1) }}|{{ s.replace('b', 'B') }}|{{ s.startswith('  a') }}|{{ s.endswith(('x', ' ')) }}",
        "{{ s.find('c') }}|{{ s.count(' ') }}|{{ s[2:5] }}|{{ s[::-1] }}|{{ s[-3:] }}|{{ 'ab' * 3 }}|{{ 'b,c' in s }}|{{ s | length }}",
        "{{ s | trim | upper | replace('B', 'x') }}|{{ s | indent(2) }}|{{ 'a\nb' | indent(2, true) }}|{{ s | title }}|{{ s | capitalize }}|{{ s | lower }}",
        "{{ \"they're 1st x-ray o'neil\".title() }}|{{ \"they're 1st x-ray o'neil\" | title }}",
        "{{ '{} and {}'.format(1, 'two') }}",
        "{{ '%s=%d' | format('a', 3) }}",
        "{{ 'x' | e }}{{ '<b>&' | escape }}|{{ '<b>' | safe }}",
        // Sequences and mappings.
        "{{ xs | join(', ') }}|{{ xs | first }}|{{ xs | last }}|{{ xs | reverse | list }}|{{ xs | sort }}|{{ xs | sum }}|{{ xs | min }}|{{ xs | max }}|{{ xs | unique | list }}",
        "{{ xs[1:] }}|{{ xs[::-1] }}|{{ xs[::2] }}|{{ xs + [9] }}|{{ xs | length }}|{{ 3 in xs }}|{{ xs | batch(2) | list }}",
        "{{ messages | map(attribute='role') | join(',') }}|{{ messages | selectattr('role', 'equalto', 'tool') | list | length }}|{{ messages | rejectattr('content') | list | length }}",
        "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{{ d | dictsort }}|{{ d.keys() | list }}|{{ d.values() | list }}|{{ d.get('b') }} {{ d.get('z', 0) }}|{{ d['a'] }} {{ d.a }}",
        "{{ d | tojson }}|{{ d | items | list }}|{{ dict(x=1, y=[2]) }}|{{ range(3) | list }}|{{ range(1, 10, 3) | list }}",
        "{{ xs | map('string') | join('-') }}|{{ xs | select('odd') | list }}|{{ '3' | int + 1 }}|{{ '2.5' | float }}|{{ 2.567 | round(2) }}|{{ -3 | abs }}",
        // Tests.
        "{{ d is mapping }} {{ xs is sequence }} {{ s is string }} {{ 1 is number }} {{ 1.5 is float }} {{ 1 is integer }} {{ true is boolean }} {{ none is none }} {{ x is defined }} {{ nothing is undefined }} {{ false is false }} {{ true is true }} {{ xs is iterable }} {{ 4 is even }} {{ 3 is odd }} {{ 6 is divisibleby 3 }}",
        // Loops, assignments, macros, filters as blocks.
        "{% for m in messages %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.cycle('a', 'b') }}{% if loop.nextitem %}>{{ loop.nextitem.role }}{% endif %} {% endfor %}",
        "{% for m in messages if m.role != 'tool' %}{{ m.role }}{% else %}none{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}",
        "{% set x = 5 %}{% for i in xs %}{% set x = i %}{% endfor %}{{ x }}|{% set ns = namespace(x=5) %}{% for i in xs %}{% set ns.x = i %}{% endfor %}{{ ns.x }}",
        "{% set block %}\n  inner {{ s }}\n{% endset %}[{{ block }}]|{% macro m(a, b='B') %}<{{ a }}{{ b }}>{% endmacro %}{{ m(1) }}{{ m(1, b=2) }}",
        "{% filter upper %}loud {{ s }}{% endfilter %}|{{ 'yes' if xs else 'no' }}|{{ (1, 2) }}|{{ [1, (2, 3)] }}",
        "{% raw %}{{ not rendered }}{% endraw %}|{# a comment #}x",
        // Whitespace control with trim_blocks and lstrip_blocks.
        "a\n  {% if true %}\n  b\n  {% endif %}\n  {#- c #}\n  {{- 'd' }}\n{%+ if true %}e{% endif +%}\nf\n    {%- if true -%}  g  {%- endif %}\n\n",
        "{% for m in messages %}\n    {{ m.role }}\n{% endfor %}\n\n  {{ 'end' }}  \n",
        "a\r\n{% if true %}\r\nb\rc{{ \"x\r\ny\" }}\r\n  {% endif %}\r\n\r\n",
        // transformers' {% generation %} marks (its AssistantTracker) render their body.
        "{% for m in messages %}\n  {% if m.role == 'assistant' %}\n    {% generation %}\n{{ m.content }}\n    {% endgeneration %}\n  {% endif %}\n{% endfor %}|{%- generation -%}  x  {%- endgeneration -%}|",
        // Undefined and none.
        "{{ messages[0].missing }}|{{ messages[0].missing is defined }}|{{ messages[0]['missing'] is none }}",
        "{{ none.attr }}",
        "{{ messages[0].missing.deeper }}",
        "{{ d.a.b.c }}",
        "{{ 'a' + 1 }}",
        "{{ xs[10] }}|{{ d.z }}|{{ d['z'] }}",
        "{% for k in d %}{{ k }}{% endfor %}|{{ d | length }}|{{ 'abc' | list }}|{{ xs | join }}|{{ 'abc'[1] }}{{ 'abc'[-1] }}|{{ s[:5] }}",
        "{{ 1 == 1.0 }} {{ 'a' < 'b' }} {{ none == none }} {{ (xs | length) > 2 }} {{ true and 'x' }} {{ 0 or 'y' }} [{{ 'a' if nothing }}]",
        "{{ nothing ~ 'a' }}",
        "{{ nothing + 'a' }}",
        "{{ 10 / 0 }}",
        "{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}",
        "{{ xs.index(4) }}|{{ xs.index(1) }}",
        "{{ xs.index(7) }}",
        "{{ [1, 'a'] ~ '' }}|{{ x ~ '' }}",
        "{{ x | tojson | safe }}|{{ d.items() | list }}|{{ x.k[1:] }}",
        "{{ messages[0]['content'][:5] }}|{{ messages | selectattr('role', 'equalto', 'system') | first }}",
        "{{ 5 | string + 'x' }}|{{ 2.0 | int }}|{{ '1e3' | float }}|{{ 3 | float }}|{{ 7 / 7 }}|{{ 1.0 * 3 }}|{{ 2 * 1.5 }}",
        "{{ xs | sum / xs | length }}|{{ (xs | sum) / (xs | length) }}|{{ 1e3 | int }}|{{ 3.0 | round }}|{{ 2.5 | round }}|{{ 3.7 | round(0, 'floor') }}",
        "{{ messages[1].content | length }}|{{ messages[1].content | upper }}|{{ messages[1].content.split('和')[0] }}",
        // Errors.
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
        "{{ raise_exception('Only ' ~ xs | length ~ ' allowed: ' ~ s) }}",
        "{% if %}",
        "{{ nothing | tojson }}",
        "{% for i in xs %}{% if i > 1 %}{% break %}{% endif %}{{ i }}{% endfor %}|{% for i in xs %}{% if i is even %}{% continue %}{% endif %}{{ i }}{% endfor %}",
    ];
    let kwargs = json!({
        "x": {"k": [1, 2.0, null, true, "it's"], "s": "say \"hi\""},
        "s": "  ab b,c x ",
        "xs": [3, 1, 4, 1, 5],
        "d": {"b": 2, "a": {"n": 1.5}, "c": [null]}
    });
    let messages = conversations()[0].1.clone();
    let cases: Vec<Case> = snippets
        .iter()
        .map(|t| Case {
            label: format!("{t:?}"),
            template: t.to_string(),
            messages: messages.clone(),
            tools: Some(tools()),
            add_generation_prompt: true,
            kwargs: kwargs.clone(),
        })
        .collect();
    let special_tokens = [("bos_token", "<s>")].map(|(k, v)| (k.to_string(), v.to_string())).into();
    let outcomes = compare(&cases, &special_tokens);
    let texts = outcomes.iter().filter(|o| matches!(o, Outcome::Text(_))).count();
    assert_eq!(texts, cases.len() - 10, "all but the ten snippets that fail on purpose render");
}
