//! The front end both protocols share: what a model's output means to a client.
//!
//! - [`chat`]: a conversation checked and rendered with the model's chat template.
//! - [`output`]: a model's text read into reasoning, the answer and tool calls, streamed or
//!   whole.
//! - [`prepare`]: a request validated, tokenized and constrained once, for either protocol.
//! - [`reader`]: one chat choice read as it comes, into pieces to stream or a whole message.
//! - [`scan`]: JSON read as the model writes it.
//! - [`structured`]: what the output must be (a schema, a regex, demanded tool calls), as one
//!   grammar the sampling rank holds every token to.

pub mod chat;
pub mod output;
pub mod prepare;
pub mod reader;
pub mod scan;
pub mod structured;
