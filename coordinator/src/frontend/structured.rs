//! Structured output: what a request's text must be (a JSON schema, a regex, a choice, a Lark
//! grammar, or the tool calls `tool_choice` demands), written as one llguidance grammar that
//! leaves a reasoning model's `<think>` block free and holds the answer after it.

use super::output::{Reasoning, ToolFormat, THINK, THINK_END};
use shardserve::guide::{regex_to_lark, TopLevelGrammar};
use shardserve_proto::v1 as pb;

/// How JSON is written under a schema unless the schema's own `x-guidance` says otherwise:
/// one line, with the separators Python's `json.dumps` writes (a model of random weights
/// would otherwise pad forever).
fn json_options() -> serde_json::Value {
    serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// What a request's output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// JSON that validates against this JSON Schema.
    Json(serde_json::Value),
    /// Text the whole of which matches this regex (Rust syntax).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
    /// Tool calls in the model's format: one or more of any tool (`tool_choice: "required"`),
    /// or exactly one (of the one named, or with `parallel_tool_calls: false`).
    Calls { format: ToolFormat, tools: Vec<Tool>, single: bool },
}

/// What a chat adds to a request's own constraint: where the model reasons (its answer is
/// constrained after that), and the calls `tool_choice` demands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Guidance {
    pub reasoning: Reasoning,
    pub calls: Option<Constraint>,
}

impl Guidance {
    /// The one constraint of a request whose own is `asked`.
    pub fn constraint(&self, asked: Option<Constraint>) -> Result<Option<Constraint>, InvalidConstraint> {
        match (asked, &self.calls) {
            (Some(_), Some(_)) => Err(invalid("tool_choice", "a demanded tool call cannot be combined with a response format")),
            (asked, calls) => Ok(asked.or_else(|| calls.clone())),
        }
    }
}

/// A tool a call may name, and its arguments' schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub parameters: serde_json::Value,
}

/// Why a constraint was refused: the request field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct InvalidConstraint {
    pub field: &'static str,
    pub why: String,
}

fn invalid(field: &'static str, why: impl Into<String>) -> InvalidConstraint {
    InvalidConstraint { field, why: why.into() }
}

/// How the special tokens a grammar may name are found: by their text, their id when the
/// tokenizer holds them as special tokens (a grammar names those by id; others are text).
pub trait Specials {
    fn special(&self, text: &str) -> Option<u32>;
}

impl Specials for shardserve::tokenizer::Tokenizer {
    fn special(&self, text: &str) -> Option<u32> {
        self.special_token_id(text)
    }
}

impl Constraint {
    /// The request field it came from, for messages.
    pub fn field(&self) -> &'static str {
        match self {
            Constraint::Calls { .. } => "tool_choice",
            _ => "structured_output",
        }
    }

    /// The constraint a `GenerateRequest.structured_output` asks for (none when unset).
    pub fn from_proto(s: Option<&pb::StructuredOutput>) -> Result<Option<Self>, InvalidConstraint> {
        use pb::structured_output::Kind;
        let Some(kind) = s.and_then(|s| s.kind.as_ref()) else { return Ok(None) };
        let c = match kind {
            Kind::JsonSchema(text) => {
                let schema: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| invalid("structured_output.json_schema", format!("not JSON: {e}")))?;
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(invalid("structured_output.json_schema", "a JSON Schema is an object (or a boolean)"));
                }
                Constraint::Json(schema)
            }
            Kind::JsonObject(true) => Constraint::Json(serde_json::json!({"type": "object"})),
            Kind::JsonObject(false) => return Ok(None),
            Kind::Regex(r) if r.is_empty() => return Err(invalid("structured_output.regex", "must not be empty")),
            Kind::Regex(r) => Constraint::Regex(r.clone()),
            Kind::Choice(c) if c.choices.is_empty() => return Err(invalid("structured_output.choice", "must name at least one string")),
            Kind::Choice(c) if c.choices.iter().any(String::is_empty) => {
                return Err(invalid("structured_output.choice", "choices must not be empty strings"))
            }
            Kind::Choice(c) => Constraint::Choice(c.choices.clone()),
            Kind::Grammar(g) if g.trim().is_empty() => return Err(invalid("structured_output.grammar", "must not be empty")),
            Kind::Grammar(g) => Constraint::Lark(g.clone()),
        };
        Ok(Some(c))
    }

    /// The calls OpenAI's `tool_choice` demands of `tools` (the request's tool list): none for
    /// `"auto"` and `"none"`, one or more for `"required"`, exactly one of the function
    /// `{"type": "function", "function": {"name": ...}}` names; one only unless `parallel`.
    /// `format` is how the model writes calls (none: its template shows no format).
    pub fn from_tool_choice(
        choice: Option<&serde_json::Value>,
        tools: Option<&serde_json::Value>,
        format: Option<ToolFormat>,
        parallel: bool,
    ) -> Result<Option<Self>, InvalidConstraint> {
        const FIELD: &str = "tool_choice";
        let unforced = |parallel: bool| match parallel {
            true => Ok(None),
            false => Err(invalid("parallel_tool_calls", "false is enforced only with tool_choice \"required\" or a named function")),
        };
        let named = match choice {
            None | Some(serde_json::Value::Null) => return unforced(parallel),
            Some(serde_json::Value::String(s)) => match s.as_str() {
                "auto" | "none" => return unforced(parallel),
                "required" => None,
                other => return Err(invalid(FIELD, format!("expected \"none\", \"auto\", \"required\" or a function, got \"{other}\""))),
            },
            Some(v @ serde_json::Value::Object(_)) => {
                if v.get("type").and_then(|t| t.as_str()) != Some("function") {
                    return Err(invalid(FIELD, "a named tool choice is {\"type\": \"function\", \"function\": {\"name\": ...}}"));
                }
                let name = v.pointer("/function/name").and_then(|n| n.as_str());
                Some(name.ok_or_else(|| invalid(FIELD, "function.name is missing"))?.to_string())
            }
            Some(_) => return Err(invalid(FIELD, "expected a string or an object")),
        };
        let listed = tools.and_then(|t| t.as_array()).filter(|t| !t.is_empty());
        let Some(listed) = listed else {
            return Err(invalid(FIELD, "a call is demanded but the request offers no tools"));
        };
        let format = format
            .ok_or_else(|| invalid(FIELD, "the model's chat template shows no tool-call format to enforce (see --tool-call-parser)"))?;
        let mut tools = Vec::with_capacity(listed.len());
        for (i, t) in listed.iter().enumerate() {
            let f = t.get("function").filter(|_| t.get("type").and_then(|x| x.as_str()) == Some("function"));
            let f = f.ok_or_else(|| invalid("tools", format!("tools[{i}] is not {{\"type\": \"function\", \"function\": {{...}}}}")))?;
            let name =
                f.get("name").and_then(|n| n.as_str()).ok_or_else(|| invalid("tools", format!("tools[{i}].function.name is missing")))?;
            let parameters = match f.get("parameters") {
                // A function without parameters takes `{}`.
                None | Some(serde_json::Value::Null) => {
                    serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false})
                }
                Some(p) => p.clone(),
            };
            tools.push(Tool { name: name.to_string(), parameters });
        }
        if let Some(name) = &named {
            tools.retain(|t| &t.name == name);
            if tools.is_empty() {
                return Err(invalid(FIELD, format!("function \"{name}\" is not among the request's tools")));
            }
            tools.truncate(1);
        }
        Ok(Some(Constraint::Calls { format, tools, single: named.is_some() || !parallel }))
    }

    /// The grammar: reasoning first where the model reasons (free, up to `</think>`), then the
    /// constrained answer.
    pub fn grammar(&self, reasoning: Reasoning, specials: &dyn Specials) -> TopLevelGrammar {
        let body = self.lark(specials);
        let start = match reasoning {
            Reasoning::Off => return TopLevelGrammar::from_lark(body),
            Reasoning::Tagged => "start: (think SPACE?)? @answer",
            Reasoning::Open => "start: think SPACE? @answer",
        };
        let rule = match (specials.special(THINK), specials.special(THINK_END)) {
            (Some(open), Some(close)) if reasoning == Reasoning::Tagged => format!("think: <[{open}]> /(.|\\n)*/ <[{close}]>"),
            (_, Some(close)) if reasoning == Reasoning::Open => format!("think: /(.|\\n)*/ <[{close}]>"),
            _ if reasoning == Reasoning::Tagged => {
                format!("think[lazy]: /{}(.|\\n)*{}/", lark_regex_literal(THINK), lark_regex_literal(THINK_END))
            }
            _ => format!("think[lazy]: /(.|\\n)*{}/", lark_regex_literal(THINK_END)),
        };
        let mut grammar = TopLevelGrammar::from_lark(format!("{start}\n{rule}\nSPACE: /[ \\t\\r\\n]+/\n"));
        let mut answer = shardserve::guide::GrammarWithLexer::from_lark(body);
        answer.name = Some("answer".into());
        grammar.grammars.push(answer);
        grammar
    }

    /// The answer alone, as a Lark grammar.
    fn lark(&self, specials: &dyn Specials) -> String {
        match self {
            Constraint::Json(schema) => format!("start: %json {}", with_options(schema)),
            // `\d` and `\w` are ASCII, as in JSON Schema's patterns.
            Constraint::Regex(r) => format!("start: /{}/", regex_to_lark(r, "dw")),
            Constraint::Choice(c) => format!("start: {}", c.iter().map(|s| lark_string(s)).collect::<Vec<_>>().join(" | ")),
            Constraint::Lark(g) => g.clone(),
            Constraint::Calls { format, tools, single } => calls_lark(*format, tools, *single, specials),
        }
    }
}

/// The schema with this server's JSON layout added, unless it sets its own.
fn with_options(schema: &serde_json::Value) -> String {
    let mut schema = schema.clone();
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(json_options);
    }
    schema.to_string()
}

/// `s` as a Lark string literal.
fn lark_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// `s` matched literally inside a Lark `/regex/`.
fn lark_regex_literal(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A marker of a call format: its special token by id, or its text.
fn marker(text: &str, specials: &dyn Specials) -> String {
    specials.special(text).map_or_else(|| lark_string(text), |id| format!("<[{id}]>"))
}

/// The calls `tools` allow in `format` (one, or one or more): each a call object of one of them,
/// its name and its arguments under the tool's schema.
fn calls_lark(format: ToolFormat, tools: &[Tool], single: bool, specials: &dyn Specials) -> String {
    let arguments = if format == ToolFormat::Llama3Json { "parameters" } else { "arguments" };
    let objects: Vec<serde_json::Value> = tools
        .iter()
        .map(|t| {
            serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, arguments: t.parameters},
                "required": ["name", arguments],
                "additionalProperties": false,
            })
        })
        .collect();
    let call = serde_json::json!({"anyOf": objects});
    match format {
        ToolFormat::Hermes => {
            let (open, close) = (marker("<tool_call>", specials), marker("</tool_call>", specials));
            let more = if single { "" } else { " (\"\\n\" call)*" };
            format!("start: call{more}\ncall: {open} \"\\n\" args \"\\n\" {close}\nargs: %json {}\n", with_options(&call))
        }
        ToolFormat::Llama3Json => {
            let tag = specials.special("<|python_tag|>").map(|id| format!("<[{id}]>? ")).unwrap_or_default();
            let more = if single { "" } else { " (\"; \" args)*" };
            format!("start: {tag}args{more}\nargs: %json {}\n", with_options(&call))
        }
        ToolFormat::Mistral => {
            let list = if single {
                serde_json::json!({"type": "array", "items": call, "minItems": 1, "maxItems": 1})
            } else {
                serde_json::json!({"type": "array", "items": call, "minItems": 1})
            };
            format!("start: {} calls\ncalls: %json {}\n", marker("[TOOL_CALLS]", specials), with_options(&list))
        }
    }
}

#[cfg(test)]
mod tests;
