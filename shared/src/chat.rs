//! Chat templates rendered as transformers' `apply_chat_template` renders them: found where
//! transformers finds them, run by minijinja in an environment built like transformers' jinja2
//! one (`_compile_jinja_template`), with Python's `json.dumps`, `str()` and string methods.
//!
//! Where minijinja still differs from jinja2 (none of it in the templates models ship, as far
//! as the tests against jinja2 reach): Python's `%` string operator is missing (the `format`
//! filter and `str.format` work); so are the filters `center`, `truncate`, `wordcount`,
//! `wordwrap`, `striptags`, `filesizeformat`, `urlize`, `xmlattr`, `random` and `forceescape`,
//! and list methods other than `count` and `index` (each fails to render, naming it); a float
//! below 1e-4 or from 1e16 up, joined with `~` or the `join` filter, is written positionally
//! where Python writes `1e-05` (printed or through `tojson` it is Python's).

mod python;

use crate::tokenizer::Tokenizer;
use minijinja::value::{Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, Output, State};
pub(crate) use python::json_string;
use python::{python_str, python_title, tojson, write_str_of};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why a chat prompt could not be made. Each message reads as a client error (HTTP 400) except
/// [`ChatError::Io`] and [`ChatError::Config`], which are the model folder's fault.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model ships no chat template.
    #[error("model {model} has no chat template (no chat_template.jinja and no chat_template in tokenizer_config.json)")]
    NoTemplate { model: String },
    /// A template was asked for by a name the model does not have.
    #[error("model {model} has no chat template named {name:?} (its templates: {})", available.join(", "))]
    UnknownTemplateName { model: String, name: String, available: Vec<String> },
    /// The model has several named templates, none of them `default`, and none was named.
    #[error("model {model} has several chat templates and none named \"default\": name one of {}", available.join(", "))]
    NoDefaultTemplate { model: String, available: Vec<String> },
    /// The template does not compile.
    #[error("chat template {template:?} of model {model} does not compile: {message}")]
    Syntax { model: String, template: String, message: String, line: Option<usize> },
    /// The template called `raise_exception(message)`: it refuses this conversation.
    #[error("chat template {template:?} of model {model} refused the conversation: {message}")]
    Raised { model: String, template: String, message: String },
    /// The template failed while rendering (an undefined value, a type error, ...).
    #[error("chat template {template:?} of model {model} failed to render: {message}")]
    Render { model: String, template: String, message: String, line: Option<usize> },
    /// `messages` is not a non-empty array of objects with a string `role`.
    #[error("messages: {0}")]
    BadMessages(String),
    /// `tools` is not an array.
    #[error("tools: {0}")]
    BadTools(String),
    /// `chat_template_kwargs` sets a variable the renderer sets itself.
    #[error("chat_template_kwargs: {0}")]
    BadKwargs(String),
    /// A file of the model could not be read.
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file of the model is malformed.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The rendered prompt could not be tokenized.
    #[error("tokenizing the chat prompt: {0}")]
    Tokenize(String),
}

/// The special tokens transformers puts in a template's context (`special_tokens_map`).
const SPECIAL_TOKENS: [&str; 7] = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// Variables the renderer sets, which `chat_template_kwargs` may not (transformers passes them
/// as keyword arguments beside the kwargs, so Python would fail on a duplicate).
const RESERVED: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

/// What one rendering takes.
#[derive(Debug, Clone, Copy)]
pub struct ChatInput<'a> {
    /// The conversation: `[{"role": ..., "content": ...}, ...]`, passed to the template as is.
    pub messages: &'a serde_json::Value,
    /// Tool definitions (`tools`), or `None` (the template sees `none`).
    pub tools: Option<&'a serde_json::Value>,
    /// Whether to end with the opening of an assistant turn.
    pub add_generation_prompt: bool,
    /// More template variables, such as `{"enable_thinking": false}`.
    pub chat_template_kwargs: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// Which of the model's named templates to use (`None`: as transformers picks).
    pub template: Option<&'a str>,
}

impl<'a> ChatInput<'a> {
    /// A conversation with no tools, no generation prompt and no extra variables.
    pub fn new(messages: &'a serde_json::Value) -> Self {
        ChatInput { messages, tools: None, add_generation_prompt: false, chat_template_kwargs: None, template: None }
    }
}

/// A model's chat templates, compiled, and the special tokens they see. Load once per model;
/// rendering takes `&self` and may run on many threads.
pub struct ChatTemplates {
    model: String,
    env: Environment<'static>,
    /// Every template by name; `Some` holds why it does not compile (reported when it is used,
    /// so one broken named template does not keep a model from serving the others).
    templates: BTreeMap<String, Option<(String, Option<usize>)>>,
    /// Every template's text, by name.
    sources: BTreeMap<String, String>,
    special_tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplates")
            .field("model", &self.model)
            .field("templates", &self.templates.keys().collect::<Vec<_>>())
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

impl ChatTemplates {
    /// Finds a model folder's templates as transformers' tokenizer does: `chat_template.jinja`
    /// (with named ones in `additional_chat_templates/NAME.jinja`) wins over
    /// `tokenizer_config.json`'s `chat_template`, a string or a list of `{name, template}`.
    /// Special tokens come from `tokenizer_config.json`, else `special_tokens_map.json`.
    /// A model without a template loads; rendering with it is [`ChatError::NoTemplate`].
    pub fn load(dir: &Path, model: impl Into<String>) -> Result<Self, ChatError> {
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let mut sources = Vec::new();
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            sources.push(("default".to_string(), read_text(&jinja)?));
            let extra = dir.join("additional_chat_templates");
            if extra.is_dir() {
                let entries = std::fs::read_dir(&extra).map_err(|e| io(&extra, e))?;
                for entry in entries {
                    let path = entry.map_err(|e| io(&extra, e))?.path();
                    if let (Some(name), Some("jinja")) =
                        (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|s| s.to_str()))
                    {
                        sources.push((name.to_string(), read_text(&path)?));
                    }
                }
            }
        } else if let Some(config) = &config {
            let path = dir.join("tokenizer_config.json");
            match config.get("chat_template") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(s)) => sources.push(("default".to_string(), s.clone())),
                Some(serde_json::Value::Array(list)) => {
                    for (i, item) in list.iter().enumerate() {
                        let field = |k: &str| item.get(k).and_then(|v| v.as_str());
                        match (field("name"), field("template")) {
                            (Some(name), Some(template)) => sources.push((name.to_string(), template.to_string())),
                            _ => {
                                return Err(ChatError::Config {
                                    path,
                                    message: format!("chat_template[{i}] must be an object with string fields name and template"),
                                })
                            }
                        }
                    }
                }
                Some(_) => {
                    return Err(ChatError::Config { path, message: "chat_template must be a string or a list of {name, template}".into() })
                }
            }
        }
        let map = read_json(&dir.join("special_tokens_map.json"))?;
        let mut special_tokens = BTreeMap::new();
        for name in SPECIAL_TOKENS {
            let token = [&config, &map].into_iter().flatten().find_map(|c| c.get(name).and_then(token_content));
            if let Some(token) = token {
                special_tokens.insert(name.to_string(), token);
            }
        }
        Ok(Self::from_sources(model, sources, special_tokens))
    }

    /// Templates given directly, by name (`"default"` for a model's only template). Special
    /// tokens are template variables such as `bos_token`.
    pub fn from_sources(
        model: impl Into<String>,
        sources: impl IntoIterator<Item = (String, String)>,
        special_tokens: BTreeMap<String, String>,
    ) -> Self {
        let mut env = environment();
        let mut templates = BTreeMap::new();
        let mut texts = BTreeMap::new();
        for (name, source) in sources {
            let failure = env
                .add_template_owned(name.clone(), rewrite_generation_tags(&normalize_newlines(&source)))
                .err()
                .map(|e| (e.to_string(), e.line()));
            templates.insert(name.clone(), failure);
            texts.insert(name, source);
        }
        ChatTemplates { model: model.into(), env, templates, sources: texts, special_tokens }
    }

    /// Whether the model has any chat template.
    pub fn has_template(&self) -> bool {
        !self.templates.is_empty()
    }

    /// The names of the model's templates.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.templates.keys().map(String::as_str)
    }

    /// The text of the template a request without a named template uses (see [`Self::select`]),
    /// as written: what it tells the model about tool calls and reasoning.
    pub fn source(&self, has_tools: bool) -> Option<&str> {
        let name = self.select(None, has_tools).ok()?;
        self.sources.get(name).map(String::as_str)
    }

    /// The special tokens the templates see, by variable name.
    pub fn special_tokens(&self) -> &BTreeMap<String, String> {
        &self.special_tokens
    }

    /// The template a request uses: the one named, else (as transformers'
    /// `get_chat_template`) `tool_use` when tools are given and there is one, else `default`.
    pub fn select(&self, name: Option<&str>, has_tools: bool) -> Result<&str, ChatError> {
        if self.templates.is_empty() {
            return Err(ChatError::NoTemplate { model: self.model.clone() });
        }
        let available = || self.templates.keys().cloned().collect::<Vec<_>>();
        let found = |n: &str| self.templates.get_key_value(n).map(|(k, _)| k.as_str());
        match name {
            Some(n) => found(n).ok_or_else(|| ChatError::UnknownTemplateName {
                model: self.model.clone(),
                name: n.to_string(),
                available: available(),
            }),
            None => has_tools
                .then(|| found("tool_use"))
                .flatten()
                .or_else(|| found("default"))
                .ok_or_else(|| ChatError::NoDefaultTemplate { model: self.model.clone(), available: available() }),
        }
    }

    /// Renders a conversation to the prompt text.
    pub fn render(&self, input: &ChatInput<'_>) -> Result<String, ChatError> {
        check_messages(input.messages)?;
        let tools = match input.tools {
            None | Some(serde_json::Value::Null) => None,
            Some(t @ serde_json::Value::Array(_)) => Some(t),
            Some(_) => return Err(ChatError::BadTools("must be an array of tool definitions".into())),
        };
        let name = self.select(input.template, tools.is_some())?;
        if let Some(Some((message, line))) = self.templates.get(name) {
            return Err(ChatError::Syntax { model: self.model.clone(), template: name.to_string(), message: message.clone(), line: *line });
        }
        // The context transformers builds: special tokens, then the caller's kwargs (which may
        // override them), then the variables it sets itself.
        let mut ctx: Vec<(String, Value)> = Vec::new();
        for (k, v) in &self.special_tokens {
            ctx.push((k.clone(), Value::from(v.as_str())));
        }
        for (k, v) in input.chat_template_kwargs.into_iter().flatten() {
            if RESERVED.contains(&k.as_str()) {
                return Err(ChatError::BadKwargs(format!("{k} is set by the request itself, not a template variable")));
            }
            ctx.push((k.clone(), json_to_value(v)));
        }
        ctx.push(("messages".into(), json_to_value(input.messages)));
        ctx.push(("tools".into(), tools.map(json_to_value).unwrap_or(Value::from(()))));
        ctx.push(("documents".into(), Value::from(())));
        ctx.push(("add_generation_prompt".into(), Value::from(input.add_generation_prompt)));
        let template = self.env.get_template(name).expect("every template that compiled is in the environment");
        template.render(Value::from_pairs(ctx)).map_err(|e| self.render_error(name, e))
    }

    fn render_error(&self, template: &str, e: minijinja::Error) -> ChatError {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if let Some(Raised(message)) = c.downcast_ref::<Raised>() {
                return ChatError::Raised { model: self.model.clone(), template: template.to_string(), message: message.clone() };
            }
            cause = c.source();
        }
        ChatError::Render { model: self.model.clone(), template: template.to_string(), message: e.to_string(), line: e.line() }
    }
}

impl ChatError {
    /// The request field an error is about, for an API error's `param`.
    pub fn param(&self) -> &'static str {
        match self {
            ChatError::BadTools(_) => "tools",
            ChatError::BadKwargs(_) => "chat_template_kwargs",
            ChatError::Io { .. } | ChatError::Config { .. } => "model",
            _ => "messages",
        }
    }
}

/// The token ids of a rendered prompt: the template already wrote the special tokens, so none
/// are added (transformers' `apply_chat_template(tokenize=True)` encodes with
/// `add_special_tokens=False`).
pub fn prompt_ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, ChatError> {
    tokenizer.encode_with(text, false).map_err(|e| ChatError::Tokenize(e.to_string()))
}

fn io(path: &Path, source: std::io::Error) -> ChatError {
    ChatError::Io { path: path.to_path_buf(), source }
}

fn read_text(path: &Path) -> Result<String, ChatError> {
    std::fs::read_to_string(path).map_err(|e| io(path, e))
}

/// A JSON file of the model, `None` when it is absent.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>, ChatError> {
    if !path.is_file() {
        return Ok(None);
    }
    serde_json::from_str(&read_text(path)?).map(Some).map_err(|e| ChatError::Config { path: path.to_path_buf(), message: e.to_string() })
}

/// A special token as tokenizer_config.json writes it: a string, or an AddedToken object.
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn check_messages(messages: &serde_json::Value) -> Result<(), ChatError> {
    let list = messages.as_array().ok_or_else(|| ChatError::BadMessages("must be an array of messages".into()))?;
    if list.is_empty() {
        return Err(ChatError::BadMessages("must not be empty".into()));
    }
    for (i, m) in list.iter().enumerate() {
        let m = m.as_object().ok_or_else(|| ChatError::BadMessages(format!("messages[{i}] must be an object")))?;
        match m.get("role") {
            Some(serde_json::Value::String(_)) => {}
            Some(_) => return Err(ChatError::BadMessages(format!("messages[{i}].role must be a string"))),
            None => return Err(ChatError::BadMessages(format!("messages[{i}] has no role"))),
        }
    }
    Ok(())
}

/// A JSON value as the template sees it: as Python's `json.loads` makes it (`1` an int, `1.0`
/// a float), objects in their order.
fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (_, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::from(a.iter().map(json_to_value).collect::<Vec<_>>()),
        serde_json::Value::Object(o) => Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), json_to_value(v)))),
    }
}

/// The error `raise_exception` raises, found again in the error chain to report its message
/// alone.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// minijinja set up as transformers sets up jinja2: `trim_blocks`, `lstrip_blocks`, no trailing
/// newline kept, loop controls, no autoescaping, Python's `str()` for printed values, and the
/// helpers `raise_exception`, `tojson` and `strftime_now`.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let mut syntax = minijinja::syntax::SyntaxConfig::builder();
    syntax.trim_blocks(true).lstrip_blocks(true).keep_trailing_newline(false);
    env.set_syntax(syntax.build().expect("the default delimiters are valid"));
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(|state, value, method, args| match (value.as_str(), method, args) {
        // pycompat's `title` is jinja2's `title` filter, which starts words only after spaces
        // and brackets; Python's method starts one after any character that is not a letter.
        (Some(s), "title", []) => Ok(Value::from(python_title(s))),
        (None, "index", [item]) if value.kind() == ValueKind::Seq => match value.try_iter()?.position(|v| &v == item) {
            Some(i) => Ok(Value::from(i)),
            None => Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("{} is not in list", python_str(item)))),
        },
        _ => minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args),
    });
    env.set_formatter(|out: &mut Output, _: &mut State, value: &Value| {
        write_str_of(out, value).map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "writing the prompt"))
    });
    env.add_filter("string", |value: Value| match value.as_str() {
        Some(_) => value,
        None => Value::from(python_str(&value)),
    });
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", |message: Value| -> Result<Value, minijinja::Error> {
        let message = python_str(&message);
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
    });
    env.add_function("strftime_now", |format: &str| -> Result<String, minijinja::Error> {
        jiff::fmt::strtime::format(format, &jiff::Zoned::now())
            .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now({format:?}): {e}")))
    });
    env
}

/// jinja2's lexer turns every `\r\n` and `\r` of a template's source into `\n` (its
/// `newline_sequence`), string literals included, before anything else; minijinja keeps them.
fn normalize_newlines(source: &str) -> String {
    source.replace("\r\n", "\n").replace('\r', "\n")
}

/// transformers' chat templates may mark assistant text with `{% generation %}` ...
/// `{% endgeneration %}` (its `AssistantTracker` extension), which renders the body unchanged.
/// minijinja has no custom tags, so the tags become `{% if true %}` ... `{% endif %}`, keeping
/// their whitespace markers and therefore their trimming.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at + 2]);
        rest = &rest[at + 2..];
        let marker = usize::from(rest.starts_with(['-', '+']));
        out.push_str(&rest[..marker]);
        rest = &rest[marker..];
        let space = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..space]);
        rest = &rest[space..];
        for (tag, replacement) in [("endgeneration", "endif"), ("generation", "if true")] {
            if let Some(after) = rest.strip_prefix(tag) {
                if !after.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
                    out.push_str(replacement);
                    rest = after;
                }
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
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
        let kw =
            json!({"d": {"a": [1, 2.5, null, true, "it's", "say \"hi\"", "both ' \""], "b": {}, "c": "tab\tnl\n\\ \u{0} \u{a0} ü 中 😀"}});
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
}
