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
mod tests;
