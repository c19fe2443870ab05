//! A model's text as OpenAI's API gives it: the reasoning (Qwen3's `<think>...</think>`) apart
//! from the answer, and tool calls in the model's own format read into calls with names and
//! arguments. One parser serves both kinds of response: streamed, it gives the growth of the
//! parse at each piece (holding back what could still turn into a tag or a call), so the
//! deltas of a stream add up to exactly what the non-streamed response holds.

use super::scan::{self, Call, Object};

/// `--tool-call-parser`: how tool calls are read out of a model's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ToolCallParser {
    /// The format the model's chat template tells it to write.
    #[default]
    Auto,
    /// None: calls stay in the text.
    None,
    Hermes,
    #[value(name = "llama3_json")]
    Llama3Json,
    Mistral,
}

impl ToolCallParser {
    /// The format calls are read in for a model whose template is `template`.
    pub fn format(self, template: Option<&str>) -> Option<ToolFormat> {
        match self {
            ToolCallParser::Auto => template.and_then(ToolFormat::detect),
            ToolCallParser::None => None,
            ToolCallParser::Hermes => Some(ToolFormat::Hermes),
            ToolCallParser::Llama3Json => Some(ToolFormat::Llama3Json),
            ToolCallParser::Mistral => Some(ToolFormat::Mistral),
        }
    }
}

/// `--reasoning-parser`: whether `<think>...</think>` is read apart from the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReasoningParser {
    /// For models whose chat template closes a `<think>` block (Qwen3, DeepSeek-R1).
    #[default]
    Auto,
    /// Never: reasoning stays in the answer.
    None,
    /// For every model.
    Think,
}

impl ReasoningParser {
    /// Whether a model whose template is `template` writes its reasoning in `<think>` blocks.
    pub fn thinks(self, template: Option<&str>) -> bool {
        match self {
            ReasoningParser::Auto => template.is_some_and(|t| t.contains(THINK_END)),
            ReasoningParser::None => false,
            ReasoningParser::Think => true,
        }
    }
}

/// How a model writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// Hermes and Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block
    /// per call.
    Hermes,
    /// Llama 3.1 to 3.3: a bare `{"name": ..., "parameters": {...}}` (after `<|python_tag|>`,
    /// if the model writes it), calls separated by `;`.
    Llama3Json,
    /// Mistral: `[TOOL_CALLS]` then a JSON list of calls, or (tokenizer v11 on)
    /// `[TOOL_CALLS]name[ARGS]{...}` per call.
    Mistral,
}

const TOOL_CALL: &str = "<tool_call>";
const TOOL_CALL_END: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const TOOL_CALLS: &str = "[TOOL_CALLS]";
const ARGS: &str = "[ARGS]";
const CALL_ID: &str = "[CALL_ID]";
pub(crate) const THINK: &str = "<think>";
pub(crate) const THINK_END: &str = "</think>";

impl ToolFormat {
    /// The format a chat template's model writes, by what the template tells it to write.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains(TOOL_CALL) {
            Some(ToolFormat::Hermes)
        } else if template.contains(TOOL_CALLS) {
            Some(ToolFormat::Mistral)
        } else if template.contains(PYTHON_TAG) || (template.contains("<|start_header_id|>") && template.contains("parameters")) {
            Some(ToolFormat::Llama3Json)
        } else {
            None
        }
    }

    /// The format's markers that are special tokens, which detokenizing skips: they are put
    /// back into the text the parser reads.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            ToolFormat::Hermes => &[],
            ToolFormat::Llama3Json => &[PYTHON_TAG],
            ToolFormat::Mistral => &[TOOL_CALLS, ARGS, CALL_ID],
        }
    }

    /// A new call id: OpenAI's `call_` and 24 letters and digits; for Mistral, whose templates
    /// accept only ids of 9, 9 letters and digits.
    pub fn call_id(self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let len = if self == ToolFormat::Mistral { 9 } else { 24 };
        let mut id = String::with_capacity(len + 5);
        if self != ToolFormat::Mistral {
            id.push_str("call_");
        }
        let mut bits = 0u64;
        for i in 0..len {
            if i % 10 == 0 {
                bits = crate::util::random_u64();
            }
            id.push(ALPHABET[(bits % 62) as usize] as char);
            bits /= 62;
        }
        id
    }
}

/// Where a model's reasoning is in its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reasoning {
    /// The text is the answer.
    #[default]
    Off,
    /// Reasoning, if any, is the `<think>...</think>` block the text starts with.
    Tagged,
    /// The prompt opened the `<think>` block: the text is reasoning up to `</think>`.
    Open,
}

impl Reasoning {
    /// Where a model whose template thinks (`template_thinks`) puts its reasoning, given the
    /// prompt rendered for it (Qwen3 with `enable_thinking: false` renders an empty block, so
    /// the model writes none; templates that open the block leave the prompt inside it).
    pub fn for_prompt(template_thinks: bool, prompt: &str) -> Self {
        if !template_thinks {
            Reasoning::Off
        } else if prompt.trim_end().ends_with(THINK) {
            Reasoning::Open
        } else {
            Reasoning::Tagged
        }
    }
}

/// A whole response read: reasoning, the answer's text and the calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub reasoning: String,
    pub content: String,
    pub calls: Vec<Call>,
}

/// What a piece of text added to a response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
    pub calls: Vec<CallDelta>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.calls.is_empty()
    }

    /// This delta followed by `next`, as one (a call's pieces joined).
    pub fn extend(&mut self, next: Delta) {
        self.reasoning.push_str(&next.reasoning);
        self.content.push_str(&next.content);
        for call in next.calls {
            match self.calls.iter_mut().find(|c| c.index == call.index) {
                Some(c) => c.arguments.push_str(&call.arguments),
                None => self.calls.push(call),
            }
        }
    }
}

/// What a piece added to call `index`: its name the first time, then more of its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallDelta {
    pub index: usize,
    pub name: Option<String>,
    pub arguments: String,
}

/// Reads a model's text as it is generated.
#[derive(Debug)]
pub struct OutputParser {
    tools: Option<ToolFormat>,
    reasoning: Reasoning,
    text: String,
    /// What has been given out so far.
    sent: Parsed,
}

impl OutputParser {
    /// A parser for calls in `tools`' format (none: the text has no calls) and reasoning as
    /// `reasoning` says.
    pub fn new(tools: Option<ToolFormat>, reasoning: Reasoning) -> Self {
        OutputParser { tools, reasoning, text: String::new(), sent: Parsed::default() }
    }

    /// Whether the text goes through as the answer, untouched.
    pub fn passthrough(&self) -> bool {
        self.tools.is_none() && self.reasoning == Reasoning::Off
    }

    /// Adds generated text; gives what it settles.
    pub fn push(&mut self, piece: &str) -> Delta {
        self.text.push_str(piece);
        let now = parse(&self.text, self.tools, self.reasoning, false);
        self.grown(now)
    }

    /// Generation ended: gives the rest.
    pub fn finish(&mut self) -> Delta {
        let now = self.parsed();
        self.grown(now)
    }

    /// The whole text read as a finished response.
    pub fn parsed(&self) -> Parsed {
        parse(&self.text, self.tools, self.reasoning, true)
    }

    /// What `now` adds to what was sent. A parse only ever extends the one before it; should a
    /// field not, nothing of it is sent rather than something wrong.
    fn grown(&mut self, now: Parsed) -> Delta {
        let mut delta = Delta::default();
        let grow = |sent: &mut String, now: &str, out: &mut String| {
            if now.len() > sent.len() && now.starts_with(sent.as_str()) {
                out.push_str(&now[sent.len()..]);
                *sent = now.to_string();
            } else if !now.starts_with(sent.as_str()) {
                tracing::debug!(sent = %sent, now = %now, "a parse did not extend the one before it");
            }
        };
        grow(&mut self.sent.reasoning, &now.reasoning, &mut delta.reasoning);
        grow(&mut self.sent.content, &now.content, &mut delta.content);
        for (index, call) in now.calls.into_iter().enumerate() {
            if index == self.sent.calls.len() {
                delta.calls.push(CallDelta { index, name: Some(call.name.clone()), arguments: call.arguments.clone() });
                self.sent.calls.push(call);
                continue;
            }
            let sent = &mut self.sent.calls[index];
            let mut arguments = String::new();
            grow(&mut sent.arguments, &call.arguments, &mut arguments);
            if !arguments.is_empty() {
                delta.calls.push(CallDelta { index, name: None, arguments });
            }
        }
        delta
    }
}

/// `text` read as a response; `at_end`: nothing more will come (else what could still change
/// is left out).
pub fn parse(text: &str, tools: Option<ToolFormat>, reasoning: Reasoning, at_end: bool) -> Parsed {
    let (thought, body) = match reasoning {
        Reasoning::Off => (None, text),
        Reasoning::Tagged => {
            let t = text.trim_start();
            if let Some(inner) = t.strip_prefix(THINK) {
                let (thought, body) = think(inner, at_end);
                (Some(thought), body)
            } else if !at_end && THINK.starts_with(t) {
                return Parsed::default();
            } else {
                (None, text)
            }
        }
        Reasoning::Open => {
            let (thought, body) = think(text, at_end);
            (Some(thought), body)
        }
    };
    // The answer after a reasoning block starts at its first word.
    let body = if thought.is_some() { body.trim_start() } else { body };
    let mut out = Parsed { reasoning: thought.unwrap_or_default(), ..Default::default() };
    let Some(format) = tools else {
        out.content = body.to_string();
        return out;
    };
    let segments = match format {
        ToolFormat::Hermes => hermes(body, at_end),
        ToolFormat::Llama3Json => llama3_json(body, at_end),
        ToolFormat::Mistral => mistral(body, at_end),
    };
    for (i, segment) in segments.iter().enumerate() {
        match segment {
            Segment::Text(t) => {
                let mut t = *t;
                if i > 0 && matches!(segments[i - 1], Segment::Call(_)) {
                    t = t.trim_start();
                }
                // Text before a call ends where the call starts; the end of the text so far
                // may be followed by one.
                if matches!(segments.get(i + 1), Some(Segment::Call(_) | Segment::Held)) || (i + 1 == segments.len() && !at_end) {
                    t = t.trim_end();
                }
                out.content.push_str(t);
            }
            Segment::Call(call) => out.calls.push(call.clone()),
            Segment::Held => {}
        }
    }
    out
}

/// A `<think>` block's inside and what follows it: the reasoning (trimmed) and the body.
fn think(inner: &str, at_end: bool) -> (String, &str) {
    match inner.find(THINK_END) {
        Some(i) => (inner[..i].trim().to_string(), &inner[i + THINK_END.len()..]),
        None if at_end => (inner.trim().to_string(), ""),
        None => (held(inner, &[THINK_END]).trim().to_string(), ""),
    }
}

/// A part of a response's body.
#[derive(Debug)]
enum Segment<'a> {
    Text(&'a str),
    Call(Call),
    /// What follows cannot be told yet.
    Held,
}

/// `s` less an end that could be the start of one of `markers`.
fn held<'a>(s: &'a str, markers: &[&str]) -> &'a str {
    let mut cut = s.len();
    for m in markers {
        for (i, _) in m.char_indices().skip(1) {
            if s.ends_with(&m[..i]) {
                cut = cut.min(s.len() - i);
            }
        }
    }
    &s[..cut]
}

/// The text at the end of a body: all of it at the end, else less what could be a marker.
fn tail<'a>(s: &'a str, markers: &[&str], at_end: bool) -> Segment<'a> {
    Segment::Text(if at_end { s } else { held(s, markers) })
}

/// A call object at the start of `s`, as far as `s` goes: the segments it makes and, if it
/// ended, the text after it.
fn call_at<'a>(s: &'a str, at_end: bool, segments: &mut Vec<Segment<'a>>) -> Option<&'a str> {
    match scan::object(s) {
        Object::Complete(call, len) => {
            segments.push(Segment::Call(call));
            Some(&s[len..])
        }
        Object::Partial(call) => {
            segments.push(Segment::Call(call));
            None
        }
        Object::Undecided if !at_end => {
            segments.push(Segment::Held);
            None
        }
        Object::Undecided | Object::Invalid => {
            segments.push(Segment::Text(s));
            None
        }
    }
}

/// Hermes: `<tool_call>` blocks, each holding one call object.
fn hermes(body: &str, at_end: bool) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    let mut rest = body;
    while let Some(open) = rest.find(TOOL_CALL) {
        segments.push(Segment::Text(&rest[..open]));
        let block = &rest[open..];
        let inner = &block[TOOL_CALL.len()..];
        let (inner, after) = match inner.find(TOOL_CALL_END) {
            Some(close) => (&inner[..close], Some(&inner[close + TOOL_CALL_END.len()..])),
            None => (inner, None),
        };
        let closed = after.is_some();
        match scan::object(inner) {
            Object::Complete(call, len) => {
                segments.push(Segment::Call(call));
                let left = &inner[len..];
                if closed || at_end {
                    segments.push(Segment::Text(left));
                } else if !held(left, &[TOOL_CALL_END]).trim().is_empty() {
                    segments.push(Segment::Text(held(left, &[TOOL_CALL_END])));
                }
            }
            Object::Partial(call) => segments.push(Segment::Call(call)),
            Object::Undecided if !closed && !at_end => segments.push(Segment::Held),
            // Not a call: the block is text, tags and all.
            Object::Undecided | Object::Invalid => {
                let len = TOOL_CALL.len() + inner.len() + if closed { TOOL_CALL_END.len() } else { 0 };
                segments.push(if closed { Segment::Text(&block[..len]) } else { tail(&block[..len], &[TOOL_CALL_END], at_end) });
            }
        }
        match after {
            Some(after) => rest = after,
            None => return segments,
        }
    }
    segments.push(tail(rest, &[TOOL_CALL], at_end));
    segments
}

/// Llama 3: the text is calls when it starts with one (after `<|python_tag|>`), else it is all
/// the answer.
fn llama3_json(body: &str, at_end: bool) -> Vec<Segment<'_>> {
    let start = body.trim_start();
    let mut rest = start.strip_prefix(PYTHON_TAG).unwrap_or(start);
    if !at_end && (rest.is_empty() || (rest.len() == start.len() && PYTHON_TAG.starts_with(rest))) {
        return vec![Segment::Held];
    }
    if !rest.trim_start().starts_with('{') {
        return vec![Segment::Text(if rest.len() == start.len() { body } else { rest })];
    }
    let mut segments = Vec::new();
    while let Some(after) = call_at(rest, at_end, &mut segments) {
        let next = after.trim_start();
        if let Some(more) = next.strip_prefix(';') {
            if !at_end && more.trim().is_empty() {
                segments.push(Segment::Held);
                break;
            }
            rest = more;
        } else if next.is_empty() && !at_end {
            segments.push(Segment::Held);
            break;
        } else {
            segments.push(Segment::Text(after));
            break;
        }
    }
    // The first object not a call: the whole text is the answer.
    if matches!(segments.first(), Some(Segment::Text(_))) {
        return vec![Segment::Text(body)];
    }
    segments
}

/// Mistral: `[TOOL_CALLS]` and a JSON list of calls, or `name[ARGS]{...}` after each marker.
fn mistral(body: &str, at_end: bool) -> Vec<Segment<'_>> {
    let Some(marker) = body.find(TOOL_CALLS) else { return vec![tail(body, &[TOOL_CALLS], at_end)] };
    let mut segments = vec![Segment::Text(&body[..marker])];
    let mut rest = &body[marker + TOOL_CALLS.len()..];
    loop {
        let start = rest.trim_start();
        if start.is_empty() {
            if !at_end {
                segments.push(Segment::Held);
            }
            return segments;
        }
        let after = if let Some(list) = start.strip_prefix('[') {
            mistral_list(list, at_end, &mut segments)
        } else {
            mistral_named(start, at_end, &mut segments)
        };
        let Some(after) = after else { return segments };
        match after.trim_start().strip_prefix(TOOL_CALLS) {
            Some(more) => rest = more,
            None => {
                segments.push(tail(after, &[TOOL_CALLS], at_end));
                return segments;
            }
        }
    }
}

/// The calls of a JSON list (after its `[`); the text after the list, if it ended.
fn mistral_list<'a>(list: &'a str, at_end: bool, segments: &mut Vec<Segment<'a>>) -> Option<&'a str> {
    let mut rest = list;
    loop {
        let next = rest.trim_start();
        match next.as_bytes().first() {
            None if at_end => return Some(""),
            None => {
                segments.push(Segment::Held);
                return None;
            }
            Some(b']') => return Some(&next[1..]),
            Some(b',') => rest = &next[1..],
            Some(b'{') => rest = call_at(next, at_end, segments)?,
            Some(_) => {
                segments.push(Segment::Text(next));
                return None;
            }
        }
    }
}

/// `name[ARGS]{...}` (with `[CALL_ID]id` before `[ARGS]` in some versions); the text after the
/// arguments, if they ended.
fn mistral_named<'a>(s: &'a str, at_end: bool, segments: &mut Vec<Segment<'a>>) -> Option<&'a str> {
    let Some(args) = s.find(ARGS) else {
        segments.push(if at_end { Segment::Text(s) } else { Segment::Held });
        return None;
    };
    let name = s[..args].split(CALL_ID).next().unwrap_or_default().trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        segments.push(tail(s, &[TOOL_CALLS], at_end));
        return None;
    }
    let value = &s[args + ARGS.len()..];
    let mut call = Call { name: name.to_string(), arguments: String::new() };
    let after = match scan::value(value) {
        scan::Value::Complete(len) => {
            call.arguments = value[..len].trim_start().to_string();
            Some(&value[len..])
        }
        scan::Value::Open => {
            call.arguments = value.trim().to_string();
            None
        }
        scan::Value::Invalid(at) => {
            call.arguments = value[..at].trim().to_string();
            Some(&value[at..])
        }
    };
    if call.arguments.is_empty() && after.is_some() {
        call.arguments = "{}".into();
    }
    segments.push(Segment::Call(call));
    after
}

#[cfg(test)]
mod tests;
