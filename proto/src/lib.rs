//! shardserve's gRPC interfaces, package `shardserve.v1`: `Inference` and `Admin` (clients and
//! operators), `Membership` (workers joining an embedded fleet), `Worker` and `Relay`
//! (internal: stages, and coordinators handing requests to their leader).

#![allow(clippy::all)]

/// The generated messages, clients and servers.
pub mod v1 {
    tonic::include_proto!("shardserve.v1");
}

/// The encoded file descriptor set, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shardserve_descriptor");
