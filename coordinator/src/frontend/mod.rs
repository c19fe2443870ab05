//! The front end both protocols share: what a model's output means to a client.
//!
//! - [`output`]: a model's text read into reasoning, the answer and tool calls, streamed or
//!   whole.
//! - [`scan`]: JSON read as the model writes it.

pub mod output;
pub mod scan;
