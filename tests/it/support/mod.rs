//! Shared helpers for kaproxy's integration tests: Apache, a recording upstream, a downstream client.

#![allow(dead_code)]

pub mod apache;
pub mod backend;
pub mod client;
