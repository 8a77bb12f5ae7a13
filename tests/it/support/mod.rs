//! Shared helpers for kaproxy's integration tests: Apache, a recording upstream, a downstream
//! client and an in-process kaproxy.

#![allow(dead_code)]

pub mod apache;
pub mod backend;
pub mod chromium;
pub mod client;
pub mod config_file;
pub mod hostile;
pub mod proxy;
