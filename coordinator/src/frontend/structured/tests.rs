use super::*;
use crate::frontend::output::parse;
use rand::{Rng, SeedableRng};
use serde_json::json;
use shardserve::config::Architecture;
use shardserve::guide::Grammars;
use shardserve::tokenizer::Tokenizer;

/// The tiny Qwen3 tokenizer: `<think>`, `</think>` and `<tool_call>` are text in it, as they
/// are in Qwen3's own.
fn tokenizer() -> Tokenizer {
    Tokenizer::from_tokenizer(shardserve::tiny::train_tokenizer(Architecture::Qwen3, 512).unwrap())
}

/// Tokens of `prefix` forced first, then random tokens among those the grammar allows until
/// the end token (taken half the time it is allowed) or `limit`: the text, and whether it ended.
fn walk(g: &Grammars, tok: &Tokenizer, grammar: &TopLevelGrammar, prefix: &str, seed: u64, limit: usize) -> (String, bool) {
    let mut guide = g.guide(grammar).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for t in tok.encode_with(prefix, false).unwrap() {
        assert!(guide.mask().unwrap().allows(t), "the grammar refuses {:?} of the prefix", g.decode(&[t]));
        guide.advance(t).unwrap();
        out.push(t);
    }
    for _ in 0..limit {
        let mask = guide.mask().unwrap();
        let allowed: Vec<u32> = (0..512u32).filter(|&t| mask.allows(t)).collect();
        assert!(!allowed.is_empty(), "nothing allowed after {:?}", g.decode(&out));
        let token = if mask.allows(2) && rng.random_bool(0.5) { 2 } else { allowed[rng.random_range(0..allowed.len())] };
        if token == 2 || token == 0 {
            return (g.decode(&out), true);
        }
        guide.advance(token).unwrap();
        out.push(token);
    }
    (g.decode(&out), false)
}

fn weather_tools() -> serde_json::Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": false,
        }}},
        {"type": "function", "function": {"name": "now"}},
    ])
}

#[test]
fn required_and_named_tool_choices_make_calls_the_parser_reads_with_valid_arguments() {
    let tok = tokenizer();
    let g = Grammars::new(&tok, 512, &[0, 2]).unwrap();
    let tools = weather_tools();
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    for (choice, reasoning, prefix) in [
        (json!("required"), Reasoning::Off, ""),
        (named.clone(), Reasoning::Off, ""),
        (json!("required"), Reasoning::Tagged, "<think>\nweather?\n</think>\n\n"),
        (named, Reasoning::Tagged, ""),
    ] {
        let c = Constraint::from_tool_choice(Some(&choice), Some(&tools), Some(ToolFormat::Hermes), true).unwrap().unwrap();
        let grammar = c.grammar(reasoning, &tok);
        let mut ended = 0;
        for seed in 0..12 {
            let (text, done) = walk(&g, &tok, &grammar, prefix, seed, 300);
            if !done {
                continue;
            }
            ended += 1;
            let p = parse(&text, Some(ToolFormat::Hermes), reasoning, true);
            assert!(!p.calls.is_empty() && p.content.trim().is_empty(), "{choice}: no call read from {text:?}: {p:?}");
            if choice.is_object() {
                assert_eq!(p.calls.len(), 1, "{text:?}");
            }
            for call in &p.calls {
                let args: serde_json::Value = serde_json::from_str(&call.arguments).unwrap_or_else(|e| panic!("{e}: {text:?}"));
                match call.name.as_str() {
                    "get_weather" => {
                        let city = args["city"].as_str().unwrap_or_else(|| panic!("no city in {text:?}"));
                        assert!(city.chars().count() <= 8, "{text:?}");
                        assert!(args.get("unit").is_none_or(|u| u == "c" || u == "f"), "{text:?}");
                        assert!(args.as_object().unwrap().keys().all(|k| k == "city" || k == "unit"), "{text:?}");
                    }
                    "now" => assert!(args == json!({}) && choice == "required", "{text:?}"),
                    other => panic!("a call of {other} from {text:?}"),
                }
            }
        }
        assert!(ended >= 4, "{choice}: only {ended} of 12 walks ended");
    }
}

#[test]
fn the_answer_after_reasoning_follows_the_schema_and_reasoning_is_free() {
    let tok = tokenizer();
    let g = Grammars::new(&tok, 512, &[0, 2]).unwrap();
    let c = Constraint::Json(json!({
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": false,
    }));
    for (reasoning, prefix) in [
        (Reasoning::Tagged, "<think>\nnot json {{ at all\n</think>\n\n"),
        // No reasoning at all: the answer starts at once.
        (Reasoning::Tagged, "{"),
        (Reasoning::Open, "free text, then </think>"),
    ] {
        let grammar = c.grammar(reasoning, &tok);
        for seed in 0..6 {
            let (text, done) = walk(&g, &tok, &grammar, prefix, seed, 100);
            assert!(done, "{text:?}");
            let p = parse(&text, None, reasoning, true);
            let v: serde_json::Value = serde_json::from_str(&p.content).unwrap_or_else(|e| panic!("{e}: {text:?} read as {p:?}"));
            assert!((1..=9).contains(&v["n"].as_i64().unwrap()), "{text:?}");
        }
    }
}

#[test]
fn choices_regexes_and_json_objects_hold() {
    let tok = tokenizer();
    let g = Grammars::new(&tok, 512, &[0, 2]).unwrap();
    let choice = Constraint::Choice(vec!["red".into(), "a \"quoted\" one".into()]).grammar(Reasoning::Off, &tok);
    let regex = Constraint::Regex(r"\d{3}/[a-z]+".into()).grammar(Reasoning::Off, &tok);
    let object = Constraint::from_proto(Some(&pb::StructuredOutput { kind: Some(pb::structured_output::Kind::JsonObject(true)) }))
        .unwrap()
        .unwrap()
        .grammar(Reasoning::Off, &tok);
    for seed in 0..8 {
        let (text, done) = walk(&g, &tok, &choice, "", seed, 40);
        assert!(done && (text == "red" || text == "a \"quoted\" one"), "{text:?}");
        let (text, done) = walk(&g, &tok, &regex, "", seed, 40);
        if done {
            let (digits, word) = text.split_once('/').unwrap();
            assert!(digits.len() == 3 && digits.chars().all(|c| c.is_ascii_digit()), "{text:?}");
            assert!(!word.is_empty() && word.chars().all(|c| c.is_ascii_lowercase()), "{text:?}");
        }
        let (text, done) = walk(&g, &tok, &object, "", seed, 200);
        if done {
            assert!(serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|e| panic!("{e}: {text:?}")).is_object());
        }
    }
}

#[test]
fn bad_constraints_are_refused_naming_the_field() {
    let tools = weather_tools();
    let hermes = Some(ToolFormat::Hermes);
    let err = |choice: serde_json::Value, tools: Option<&serde_json::Value>, format| {
        Constraint::from_tool_choice(Some(&choice), tools, format, true).unwrap_err().to_string()
    };
    assert!(err(json!("always"), Some(&tools), hermes).starts_with("tool_choice: expected"));
    assert!(err(json!("required"), None, hermes).contains("offers no tools"));
    assert!(err(json!("required"), Some(&tools), None).contains("--tool-call-parser"));
    assert!(err(json!({"type": "function", "function": {"name": "nope"}}), Some(&tools), hermes).contains("\"nope\" is not among"));
    assert!(err(json!({"type": "function"}), Some(&tools), hermes).contains("function.name is missing"));
    assert!(
        err(json!("required"), Some(&json!([{"type": "function", "function": {}}])), hermes).starts_with("tools: tools[0].function.name")
    );
    for choice in [json!("auto"), json!("none"), serde_json::Value::Null] {
        assert_eq!(Constraint::from_tool_choice(Some(&choice), Some(&tools), hermes, true).unwrap(), None);
        let e = Constraint::from_tool_choice(Some(&choice), Some(&tools), hermes, false).unwrap_err();
        assert_eq!(e.field, "parallel_tool_calls");
    }
    let one = Constraint::from_tool_choice(Some(&json!("required")), Some(&tools), hermes, false).unwrap().unwrap();
    assert!(matches!(one, Constraint::Calls { single: true, .. }));
    use pb::structured_output::Kind;
    let of = |k: Kind| Constraint::from_proto(Some(&pb::StructuredOutput { kind: Some(k) }));
    assert_eq!(of(Kind::JsonSchema("{".into())).unwrap_err().field, "structured_output.json_schema");
    assert!(of(Kind::JsonSchema("[1]".into())).unwrap_err().why.contains("is an object"));
    assert!(of(Kind::Choice(pb::Choices { choices: vec![] })).is_err());
    assert!(of(Kind::Regex(String::new())).is_err());
    assert!(of(Kind::Grammar(" ".into())).is_err());
    assert_eq!(of(Kind::JsonObject(false)).unwrap(), None);
    assert_eq!(Constraint::from_proto(None).unwrap(), None);
}

#[test]
fn the_other_formats_name_their_markers_by_id_when_they_are_special_tokens() {
    struct Mistral;
    impl Specials for Mistral {
        fn special(&self, text: &str) -> Option<u32> {
            (text == "[TOOL_CALLS]").then_some(9)
        }
    }
    let tools = weather_tools();
    let lark = |format| {
        let c = Constraint::from_tool_choice(Some(&json!("required")), Some(&tools), Some(format), true).unwrap().unwrap();
        c.lark(&Mistral)
    };
    assert!(lark(ToolFormat::Mistral).starts_with("start: <[9]> calls"), "{}", lark(ToolFormat::Mistral));
    assert!(lark(ToolFormat::Llama3Json).contains("\"parameters\""), "{}", lark(ToolFormat::Llama3Json));
    assert!(lark(ToolFormat::Hermes).contains("call: \"<tool_call>\""), "{}", lark(ToolFormat::Hermes));
}
