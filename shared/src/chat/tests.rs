//! The chat templates against transformers' rendering and Python's filters, and their errors.

use super::python::*;
use super::*;
use serde_json::json;

fn one(source: &str) -> ChatTemplates {
    ChatTemplates::from_sources("m", [("default".to_string(), source.to_string())], BTreeMap::new())
}

/// Renders `source` with one user message and `kwargs` as template variables.
fn render(source: &str, kwargs: serde_json::Value) -> Result<String, ChatError> {
    let messages = json!([{"role": "user", "content": "hi"}]);
    one(source).render(&ChatInput { chat_template_kwargs: kwargs.as_object(), ..ChatInput::new(&messages) })
}

/// A string Python printed with `print(json.dumps(s))`.
fn py(printed: &str) -> String {
    serde_json::from_str(printed).unwrap()
}

#[test]
fn tojson_is_pythons_json_dumps() {
    let x = json!({"b": 1, "a": [1.0, 2.5, -0.0, 1e-5, 0.0001, 1e16, 1.5e300, 123456789012345678u64, true, null],
            "ü": "naïve 中文 😀", "esc": "q\"b\\s/n\nt\tc\u{1}\u{7f}<>&'\u{2028}"});
    let y = json!({"e": [], "d": {}, "n": {"k": [1, {"z": 2}]}});
    let kw = json!({"x": x, "y": y, "z": {"b": 1, "a": {"d": 1, "c": 2}}, "w": {"b": [1, 2], "a": "x"}, "v": {"b": [1, 2]}});
    let cases = [
        (
            "{{ x | tojson }}",
            r#""{\"b\": 1, \"a\": [1.0, 2.5, -0.0, 1e-05, 0.0001, 1e+16, 1.5e+300, 123456789012345678, true, null], \"\u00fc\": \"na\u00efve \u4e2d\u6587 \ud83d\ude00\", \"esc\": \"q\\\"b\\\\s/n\\nt\\tc\\u0001\u007f<>&'\u2028\"}""#,
        ),
        (
            "{{ x | tojson(ensure_ascii=true) }}",
            r#""{\"b\": 1, \"a\": [1.0, 2.5, -0.0, 1e-05, 0.0001, 1e+16, 1.5e+300, 123456789012345678, true, null], \"\\u00fc\": \"na\\u00efve \\u4e2d\\u6587 \\ud83d\\ude00\", \"esc\": \"q\\\"b\\\\s/n\\nt\\tc\\u0001\\u007f<>&'\\u2028\"}""#,
        ),
        // transformers' first parameter after the value is ensure_ascii, not indent.
        (
            "{{ x | tojson(true) }}",
            r#""{\"b\": 1, \"a\": [1.0, 2.5, -0.0, 1e-05, 0.0001, 1e+16, 1.5e+300, 123456789012345678, true, null], \"\\u00fc\": \"na\\u00efve \\u4e2d\\u6587 \\ud83d\\ude00\", \"esc\": \"q\\\"b\\\\s/n\\nt\\tc\\u0001\\u007f<>&'\\u2028\"}""#,
        ),
        (
            "{{ y | tojson(indent=2) }}",
            r#""{\n  \"e\": [],\n  \"d\": {},\n  \"n\": {\n    \"k\": [\n      1,\n      {\n        \"z\": 2\n      }\n    ]\n  }\n}""#,
        ),
        ("{{ z | tojson(indent='\t', sort_keys=true) }}", r#""{\n\t\"a\": {\n\t\t\"c\": 2,\n\t\t\"d\": 1\n\t},\n\t\"b\": 1\n}""#),
        ("{{ w | tojson(separators=(',', ':')) }}", r#""{\"b\":[1,2],\"a\":\"x\"}""#),
        ("{{ v | tojson(indent=0) }}", r#""{\n\"b\": [\n1,\n2\n]\n}""#),
    ];
    for (template, want) in cases {
        assert_eq!(render(template, kw.clone()).unwrap(), py(want), "{template}");
    }
    let err = render("{{ nothing | tojson }}", json!({})).unwrap_err();
    assert!(matches!(err, ChatError::Render { .. }), "{err}");
}

#[test]
fn floats_print_as_python_repr() {
    let cases = [
        (0.1, "0.1"),
        (1.0 / 3.0, "0.3333333333333333"),
        (1e15, "1000000000000000.0"),
        (9999999999999998.0, "9999999999999998.0"),
        (1e16, "1e+16"),
        (1.5e16, "1.5e+16"),
        (1e-4, "0.0001"),
        (1.2345e-5, "1.2345e-05"),
        (5e-324, "5e-324"),
        (f64::MAX, "1.7976931348623157e+308"),
        (-2.5, "-2.5"),
        (100.0, "100.0"),
        (123456.789, "123456.789"),
        (1e22, "1e+22"),
        (0.1 + 0.2, "0.30000000000000004"),
    ];
    for (x, want) in cases {
        assert_eq!(float_repr(x), want, "{x:e}");
    }
}

#[test]
fn printed_values_are_pythons_str() {
    let kw = json!({"d": {"a": [1, 2.5, null, true, "it's", "say \"hi\"", "both ' \""], "b": {}, "c": "tab\tnl\n\\ \u{0} \u{a0} ü 中 😀"}});
    let want = r#"{'a': [1, 2.5, None, True, "it's", 'say "hi"', 'both \' "'], 'b': {}, 'c': 'tab\tnl\n\\ \x00 \xa0 ü 中 😀'}"#;
    assert_eq!(render("{{ d }}", kw.clone()).unwrap(), want);
    assert_eq!(render("{{ d | string }}", kw).unwrap(), want);
    assert_eq!(render("{{ true }} {{ none }} {{ 1.0 }} {{ nothing }}.", json!({})).unwrap(), "True None 1.0 .");
}

#[test]
fn helpers_and_syntax_of_transformers_environment() {
    // trim_blocks and lstrip_blocks; the template's one trailing newline is dropped.
    let t = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}\n";
    assert_eq!(render(t, json!({})).unwrap(), "[hi]\n");
    assert_eq!(render("{{ messages[0].content }}\n\n", json!({})).unwrap(), "hi\n");
    let t = "{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}";
    assert_eq!(render(t, json!({})).unwrap(), "02");
    let t = "{% set ns = namespace(n=0) %}{% for m in xs[::-1] %}{% set ns.n = ns.n + m %}{% endfor %}{{ ns.n }} {{ xs[1:] }}";
    assert_eq!(render(t, json!({"xs": [1, 2, 3]})).unwrap(), "6 [2, 3]");
    let t = "{{ s.strip().split(' ')[-1].upper() }} {{ s.lstrip().startswith('a') }} {{ s.rstrip('x ').replace('a', 'o').title() }}";
    assert_eq!(render(t, json!({"s": "  ab cd x "})).unwrap(), "X True   Ob Cd");
    let t = "{% generation %}{{ messages[0].content }}{% endgeneration %}\n{%- generation -%}!{%- endgeneration %}";
    assert_eq!(render(t, json!({})).unwrap(), "hi!");
    // The caller's variables override the special tokens, as in transformers.
    let t = ChatTemplates::from_sources(
        "m",
        [("default".into(), "{{ bos_token }}".into())],
        [("bos_token".to_string(), "<s>".to_string())].into(),
    );
    let messages = json!([{"role": "user", "content": "hi"}]);
    assert_eq!(t.render(&ChatInput::new(&messages)).unwrap(), "<s>");
    let kwargs = json!({"bos_token": "<bos>"});
    assert_eq!(t.render(&ChatInput { chat_template_kwargs: kwargs.as_object(), ..ChatInput::new(&messages) }).unwrap(), "<bos>");
    let year = render("{{ strftime_now('%Y') }}", json!({})).unwrap();
    assert_eq!(year, jiff::Zoned::now().year().to_string());
}

#[test]
fn templates_are_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<ChatTemplates>();
}

#[test]
fn errors_are_typed_and_say_what_failed() {
    match render("{{ raise_exception('Roles must alternate user/assistant') }}", json!({})).unwrap_err() {
        ChatError::Raised { message, .. } => assert_eq!(message, "Roles must alternate user/assistant"),
        e => panic!("expected Raised, got {e}"),
    }
    match render("hello\n{% if %}", json!({})).unwrap_err() {
        ChatError::Syntax { line, message, .. } => {
            assert_eq!(line, Some(2));
            assert!(message.contains("syntax error"), "{message}");
        }
        e => panic!("expected Syntax, got {e}"),
    }
    match render("{{ messages[0].content + 1 }}", json!({})).unwrap_err() {
        ChatError::Render { message, line, .. } => {
            assert_eq!(line, Some(1));
            assert!(message.contains("invalid operation"), "{message}");
        }
        e => panic!("expected Render, got {e}"),
    }
    let t = one("{{ messages }}");
    let bad = |messages: serde_json::Value| t.render(&ChatInput::new(&messages)).unwrap_err();
    for (messages, says) in [
        (json!({"role": "user"}), "must be an array"),
        (json!([]), "must not be empty"),
        (json!([{"role": "user", "content": "a"}, "b"]), "messages[1] must be an object"),
        (json!([{"content": "a"}]), "messages[0] has no role"),
        (json!([{"role": 1}]), "messages[0].role must be a string"),
    ] {
        let e = bad(messages);
        assert!(matches!(e, ChatError::BadMessages(_)) && e.to_string().contains(says), "{e}");
    }
    let messages = json!([{"role": "user", "content": "a"}]);
    let kwargs = json!({"messages": []});
    let e = t.render(&ChatInput { chat_template_kwargs: kwargs.as_object(), ..ChatInput::new(&messages) }).unwrap_err();
    assert!(matches!(e, ChatError::BadKwargs(_)) && e.param() == "chat_template_kwargs", "{e}");
    let tools = json!({"type": "function"});
    let e = t.render(&ChatInput { tools: Some(&tools), ..ChatInput::new(&messages) }).unwrap_err();
    assert!(matches!(e, ChatError::BadTools(_)) && e.param() == "tools", "{e}");
}

fn write(dir: &Path, file: &str, text: &str) {
    let path = dir.join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn templates_are_found_where_transformers_finds_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let messages = json!([{"role": "user", "content": "hi"}]);
    let input = ChatInput::new(&messages);

    // No template: the model loads, chat is refused.
    write(d, "tokenizer_config.json", r#"{"eos_token": "</s>"}"#);
    let t = ChatTemplates::load(d, "org/base").unwrap();
    assert!(!t.has_template());
    let e = t.render(&input).unwrap_err();
    assert!(matches!(e, ChatError::NoTemplate { .. }));
    assert!(e.to_string().contains("model org/base has no chat template"), "{e}");

    // A string in tokenizer_config.json; special tokens as strings or AddedToken objects.
    write(
        d,
        "tokenizer_config.json",
        r#"{"chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
                "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false}, "eos_token": "</s>", "pad_token": null}"#,
    );
    let t = ChatTemplates::load(d, "m").unwrap();
    assert_eq!(t.render(&input).unwrap(), "<s>hi</s>");
    assert_eq!(t.special_tokens().keys().collect::<Vec<_>>(), ["bos_token", "eos_token"]);

    // chat_template.jinja wins over tokenizer_config.json.
    write(d, "chat_template.jinja", "file: {{ messages[0].content }}\n");
    assert_eq!(ChatTemplates::load(d, "m").unwrap().render(&input).unwrap(), "file: hi");
    write(d, "additional_chat_templates/rag.jinja", "rag");
    let t = ChatTemplates::load(d, "m").unwrap();
    assert_eq!(t.names().collect::<Vec<_>>(), ["default", "rag"]);
    assert_eq!(t.render(&ChatInput { template: Some("rag"), ..input }).unwrap(), "rag");
    std::fs::remove_file(d.join("chat_template.jinja")).unwrap();

    // A list of named templates: default unless named, tool_use when tools are given.
    write(
        d,
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools: {{ tools | length }}"}]}"#,
    );
    let t = ChatTemplates::load(d, "m").unwrap();
    assert_eq!(t.render(&input).unwrap(), "plain");
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    assert_eq!(t.render(&ChatInput { tools: Some(&tools), ..input }).unwrap(), "tools: 1");
    assert_eq!(t.render(&ChatInput { tools: Some(&tools), template: Some("default"), ..input }).unwrap(), "plain");
    match t.render(&ChatInput { template: Some("rag"), ..input }).unwrap_err() {
        ChatError::UnknownTemplateName { name, available, .. } => {
            assert_eq!(name, "rag");
            assert_eq!(available, ["default", "tool_use"]);
        }
        e => panic!("expected UnknownTemplateName, got {e}"),
    }
    write(d, "tokenizer_config.json", r#"{"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "{% if %}"}]}"#);
    let t = ChatTemplates::load(d, "m").unwrap();
    assert!(matches!(t.render(&input).unwrap_err(), ChatError::NoDefaultTemplate { .. }));
    assert_eq!(t.render(&ChatInput { template: Some("a"), ..input }).unwrap(), "A");
    assert!(matches!(t.render(&ChatInput { template: Some("b"), ..input }).unwrap_err(), ChatError::Syntax { .. }));

    write(d, "tokenizer_config.json", r#"{"chat_template": 5}"#);
    assert!(matches!(ChatTemplates::load(d, "m").unwrap_err(), ChatError::Config { .. }));
}
