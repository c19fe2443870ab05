//! The front end both protocols share: what a model's output means to a client.
//!
//! - [`chat`]: a conversation checked and rendered with the model's chat template.
//! - [`output`]: a model's text read into reasoning, the answer and tool calls, streamed or
//!   whole.
//! - [`scan`]: JSON read as the model writes it.

pub mod chat;
pub mod output;
pub mod scan;
