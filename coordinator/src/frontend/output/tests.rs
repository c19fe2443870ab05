//! Model outputs written from each format's specification (Qwen3's and Hermes' chat templates,
//! Meta's Llama 3.1 prompt format, Mistral's tokenizer versions), read whole and streamed in
//! every way a detokenizer could cut them.

use super::*;
use rand::{Rng, SeedableRng};

fn call(name: &str, arguments: &str) -> Call {
    Call { name: name.into(), arguments: arguments.into() }
}

fn parsed(reasoning: &str, content: &str, calls: Vec<Call>) -> Parsed {
    Parsed { reasoning: reasoning.into(), content: content.into(), calls }
}

/// `text` streamed in pieces ending at `cuts` (byte offsets on char boundaries), the deltas put
/// back together as a client would. A call's name must come once, in its first delta, and
/// calls in order.
fn streamed(text: &str, tools: Option<ToolFormat>, reasoning: Reasoning, cuts: &[usize]) -> Parsed {
    let mut parser = OutputParser::new(tools, reasoning);
    let mut out = Parsed::default();
    let mut apply = |d: Delta| {
        out.reasoning.push_str(&d.reasoning);
        out.content.push_str(&d.content);
        for c in d.calls {
            match c.name {
                Some(name) => {
                    assert_eq!(c.index, out.calls.len(), "a call's name comes once, in order");
                    out.calls.push(call(&name, &c.arguments));
                }
                None => out.calls[c.index].arguments.push_str(&c.arguments),
            }
        }
    };
    let mut from = 0;
    for &cut in cuts.iter().chain([text.len()].iter()) {
        apply(parser.push(&text[from..cut]));
        from = cut;
    }
    apply(parser.finish());
    assert_eq!(parser.parsed(), parse(text, tools, reasoning, true));
    out
}

/// Every way of cutting `text` this test tries: one piece, each char alone, each cut in two,
/// and random pieces of 1 to 8 bytes.
fn cuttings(text: &str) -> Vec<Vec<usize>> {
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).skip(1).collect();
    let mut all = vec![Vec::new(), bounds.clone()];
    all.extend(bounds.iter().map(|&b| vec![b]));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..20 {
        let mut cuts = Vec::new();
        let mut at = 0;
        loop {
            at += rng.random_range(1..=8);
            while at < text.len() && !text.is_char_boundary(at) {
                at += 1;
            }
            if at >= text.len() {
                break;
            }
            cuts.push(at);
        }
        all.push(cuts);
    }
    all
}

/// Reads `text` whole and streamed every way: all must give `want`.
fn check(text: &str, tools: Option<ToolFormat>, reasoning: Reasoning, want: &Parsed) {
    assert_eq!(&parse(text, tools, reasoning, true), want, "whole: {text:?}");
    for cuts in cuttings(text) {
        assert_eq!(&streamed(text, tools, reasoning, &cuts), want, "streamed, cut at {cuts:?}: {text:?}");
    }
}

const HERMES: Option<ToolFormat> = Some(ToolFormat::Hermes);

#[test]
fn qwen3_reasoning_then_a_call() {
    let text = "<think>\nThe user wants the weather in Paris. I should call get_weather.\n</think>\n\n<tool_call>\n\
                {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>";
    let want = parsed(
        "The user wants the weather in Paris. I should call get_weather.",
        "",
        vec![call("get_weather", r#"{"city": "Paris", "unit": "celsius"}"#)],
    );
    check(text, HERMES, Reasoning::Tagged, &want);
}

#[test]
fn hermes_calls_after_text_and_in_parallel() {
    let text = "Let me check both cities.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
                <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Tōkyō\", \"days\": [1, 2]}}\n</tool_call>";
    let want = parsed(
        "",
        "Let me check both cities.",
        vec![call("get_weather", r#"{"city": "Paris"}"#), call("get_weather", r#"{"city": "Tōkyō", "days": [1, 2]}"#)],
    );
    check(text, HERMES, Reasoning::Off, &want);
}

#[test]
fn a_tool_without_parameters_keeps_its_empty_object() {
    // vLLM #28806: the `{}` of a call without arguments was lost.
    for text in [
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_time\"}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": null}\n</tool_call>",
    ] {
        check(text, HERMES, Reasoning::Off, &parsed("", "", vec![call("get_time", "{}")]));
    }
}

#[test]
fn no_raw_tag_reaches_the_content_however_the_text_is_cut() {
    // vLLM #28297: pieces of `<tool_call>` leaked into the streamed content.
    let text = "Sure.<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": \"<b>\"}}</tool_call>";
    let want = parsed("", "Sure.", vec![call("f", r#"{"x": "<b>"}"#)]);
    check(text, HERMES, Reasoning::Tagged, &want);
    for cuts in cuttings(text) {
        let mut parser = OutputParser::new(HERMES, Reasoning::Tagged);
        let mut from = 0;
        for &cut in cuts.iter().chain([text.len()].iter()) {
            let d = parser.push(&text[from..cut]);
            assert!(!d.content.contains('<'), "cut at {cuts:?}: {d:?}");
            from = cut;
        }
        assert!(!parser.finish().content.contains('<'));
    }
}

#[test]
fn with_thinking_off_a_call_is_not_reasoning() {
    // vLLM #19017: with enable_thinking false the call ended up in reasoning_content. Qwen3's
    // template then renders an empty block into the prompt, and the model writes none.
    let prompt = "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
    let reasoning = Reasoning::for_prompt(true, prompt);
    assert_eq!(reasoning, Reasoning::Tagged);
    let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    check(text, HERMES, reasoning, &parsed("", "", vec![call("get_weather", r#"{"city": "Paris"}"#)]));
    // A template that opens the block leaves the model inside it.
    let opened = Reasoning::for_prompt(true, "<|im_start|>assistant\n<think>\n");
    assert_eq!(opened, Reasoning::Open);
    let text =
        "Paris is asked for.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    check(text, HERMES, opened, &parsed("Paris is asked for.", "", vec![call("get_weather", r#"{"city": "Paris"}"#)]));
    assert_eq!(Reasoning::for_prompt(false, "<think>\n"), Reasoning::Off);
}

#[test]
fn long_arguments_stream_whole_in_any_pieces() {
    // vLLM #19056 and #21301: arguments broken or lost when streamed in larger pieces.
    let arguments = r#"{"query": "SELECT * FROM t WHERE a = \"x}\" AND b = '{'", "limit": 10, "nested": {"list": [{"k": [1, 2, {"z": null}]}], "flag": true}}"#;
    let text = format!("<think>\nA query.\n</think>\n\n<tool_call>\n{{\"name\": \"run_sql\", \"arguments\": {arguments}}}\n</tool_call>");
    check(&text, HERMES, Reasoning::Tagged, &parsed("A query.", "", vec![call("run_sql", arguments)]));
}

#[test]
fn malformed_output_is_content() {
    for text in [
        "<tool_call>\nnot json at all\n</tool_call>",
        "<tool_call>{\"city\": \"Paris\"}</tool_call>",
        "I would use <tool_call but I won't.",
        "<tool_call>{\"name\": 7}</tool_call> and more",
    ] {
        check(text, HERMES, Reasoning::Off, &parsed("", text, vec![]));
    }
    // Cut off mid-call (max_tokens): the call as far as it was written.
    let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par";
    check(text, HERMES, Reasoning::Off, &parsed("", "", vec![call("get_weather", r#"{"city": "Par"#)]));
    // Cut off before the name is whole: no call.
    let text = "<tool_call>\n{\"name\": \"get_wea";
    check(text, HERMES, Reasoning::Off, &parsed("", text, vec![]));
}

#[test]
fn reasoning_without_tools() {
    let text = "<think>\nTwo and two.\n</think>\n\nThe answer is 4.";
    check(text, None, Reasoning::Tagged, &parsed("Two and two.", "The answer is 4.", vec![]));
    // Never closed: all reasoning. Not opened: all answer.
    check("<think>\nStill thinking", None, Reasoning::Tagged, &parsed("Still thinking", "", vec![]));
    check("Plain answer, </think> and all.", None, Reasoning::Tagged, &parsed("", "Plain answer, </think> and all.", vec![]));
    check("<thin", None, Reasoning::Tagged, &parsed("", "<thin", vec![]));
}

#[test]
fn without_tools_or_reasoning_the_text_goes_through_untouched() {
    let text = "  spaced <tool_call> text \n\n";
    let parser = OutputParser::new(None, Reasoning::Off);
    assert!(parser.passthrough());
    check(text, None, Reasoning::Off, &parsed("", text, vec![]));
    let mut parser = OutputParser::new(None, Reasoning::Off);
    assert_eq!(parser.push("  a ").content, "  a ");
}

#[test]
fn answers_with_tools_offered_keep_their_text() {
    let text = "Hello!\n\nHow can I help you today?\n";
    check(text, HERMES, Reasoning::Tagged, &parsed("", text, vec![]));
}

const LLAMA: Option<ToolFormat> = Some(ToolFormat::Llama3Json);

#[test]
fn llama3_json_calls() {
    let text = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#;
    check(text, LLAMA, Reasoning::Off, &parsed("", "", vec![call("get_weather", r#"{"city": "Paris"}"#)]));
    let text = r#"<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}"#;
    check(text, LLAMA, Reasoning::Off, &parsed("", "", vec![call("get_weather", r#"{"city": "Paris"}"#), call("get_time", "{}")]));
    for text in ["The weather in Paris is mild.", r#"{"answer": 42}"#, "<|python"] {
        check(text, LLAMA, Reasoning::Off, &parsed("", text, vec![]));
    }
}

const MISTRAL: Option<ToolFormat> = Some(ToolFormat::Mistral);

#[test]
fn mistral_calls() {
    let text = r#"[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]"#;
    let want = parsed("", "", vec![call("get_weather", r#"{"city": "Paris"}"#), call("get_time", "{}")]);
    check(text, MISTRAL, Reasoning::Off, &want);
    let text = r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}"#;
    check(text, MISTRAL, Reasoning::Off, &want);
    let text = r#"Checking.[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}"#;
    check(text, MISTRAL, Reasoning::Off, &parsed("", "Checking.", vec![call("get_weather", r#"{"city": "Paris"}"#)]));
    check("No tools needed [TOOL", MISTRAL, Reasoning::Off, &parsed("", "No tools needed [TOOL", vec![]));
}

#[test]
fn formats_are_told_from_templates() {
    let qwen3 = include_str!("../../../../tests/fixtures/chat/qwen3.jinja");
    assert_eq!(ToolFormat::detect(qwen3), Some(ToolFormat::Hermes));
    assert!(qwen3.contains("</think>"), "Qwen3's template thinks");
    assert_eq!(ToolFormat::detect("{{ '[TOOL_CALLS]' }}{{ tool_calls | tojson }}"), Some(ToolFormat::Mistral));
    assert_eq!(ToolFormat::detect("{{- '<|python_tag|>' }}"), Some(ToolFormat::Llama3Json));
    assert_eq!(ToolFormat::detect("{{ messages }}"), None);
}

#[test]
fn call_ids_look_like_openais() {
    let id = ToolFormat::Hermes.call_id();
    assert!(id.starts_with("call_") && id.len() == 29 && id[5..].chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
    assert_ne!(id, ToolFormat::Hermes.call_id());
    let id = ToolFormat::Mistral.call_id();
    assert!(id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
}
