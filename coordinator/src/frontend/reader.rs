//! One chat choice's text read as the engine gives it — the format's markers put back, then
//! reasoning, answer and tool calls — as pieces to stream (each call's id and name once) or as
//! a whole message. The HTTP and gRPC handlers only write these in their own shapes.

use super::chat::Reading;
use super::output::{Delta, OutputParser, Reasoning, ToolFormat};
use super::scan::Call;
use crate::engine::GenEvent;

/// What an event adds to a choice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Piece {
    pub reasoning: String,
    pub content: String,
    pub calls: Vec<CallPiece>,
}

impl Piece {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.calls.is_empty()
    }
}

/// A piece of one call: its id and name on its first piece only, then arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallPiece {
    pub index: usize,
    /// Set on the call's first piece: its id and the function's name.
    pub id_and_name: Option<(String, String)>,
    pub arguments: String,
}

/// A choice read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `None` when the model does not reason in blocks.
    pub reasoning: Option<String>,
    /// `None` when the message is only calls.
    pub content: Option<String>,
    /// Each call with its id.
    pub calls: Vec<(String, Call)>,
}

/// Reads one choice.
#[derive(Debug)]
pub struct ChatReader {
    parser: OutputParser,
    format: Option<ToolFormat>,
    reasoning: Reasoning,
    markers: Vec<(u32, &'static str)>,
    /// The ids of the calls given out so far.
    ids: usize,
    finished: bool,
}

impl ChatReader {
    pub fn new(reading: &Reading) -> Self {
        ChatReader {
            parser: OutputParser::new(reading.format, reading.reasoning),
            format: reading.format,
            reasoning: reading.reasoning,
            markers: reading.markers.clone(),
            ids: 0,
            finished: false,
        }
    }

    /// An event's text with the format's markers put back (after the text: a marker is a token
    /// of its own, and ends the text before it).
    fn text(&self, ev: &GenEvent) -> String {
        let mut text = ev.text.clone();
        for id in &ev.token_ids {
            if let Some((_, marker)) = self.markers.iter().find(|(m, _)| m == id) {
                text.push_str(marker);
            }
        }
        text
    }

    /// What `ev` adds, to stream (empty when it settles nothing yet).
    pub fn piece(&mut self, ev: &GenEvent) -> Piece {
        if self.parser.passthrough() {
            return Piece { content: ev.text.clone(), ..Piece::default() };
        }
        let mut delta = self.parser.push(&self.text(ev));
        if ev.finish_reason.is_some() {
            delta.extend(self.parser.finish());
            self.finished = true;
        }
        self.piece_of(delta)
    }

    /// What is still held when the choice ended without a last event.
    pub fn end(&mut self) -> Option<Piece> {
        if self.finished || self.parser.passthrough() {
            return None;
        }
        self.finished = true;
        let delta = self.parser.finish();
        (!delta.is_empty()).then(|| self.piece_of(delta))
    }

    fn piece_of(&mut self, delta: Delta) -> Piece {
        let calls = delta
            .calls
            .into_iter()
            .map(|c| CallPiece { index: c.index, id_and_name: c.name.map(|name| (self.new_id(), name)), arguments: c.arguments })
            .collect();
        Piece { reasoning: delta.reasoning, content: delta.content, calls }
    }

    fn new_id(&mut self) -> String {
        self.ids += 1;
        self.format.unwrap_or(ToolFormat::Hermes).call_id()
    }

    /// Adds an event's text to a choice read whole.
    pub fn push(&mut self, ev: &GenEvent) {
        let text = self.text(ev);
        self.parser.push(&text);
    }

    /// The whole message.
    pub fn message(&mut self) -> Message {
        let parsed = self.parser.parsed();
        let content = (!parsed.content.is_empty() || parsed.calls.is_empty()).then_some(parsed.content);
        let reasoning = (self.reasoning != Reasoning::Off).then_some(parsed.reasoning);
        let calls = parsed.calls.into_iter().map(|c| (self.new_id(), c)).collect();
        Message { reasoning, content, calls }
    }

    /// Whether the choice made calls (OpenAI's `finish_reason: "tool_calls"`).
    pub fn called(&self) -> bool {
        self.ids > 0
    }
}
