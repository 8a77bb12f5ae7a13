//! Shared helpers for kaproxy's integration tests: a recording upstream, a downstream client,
//! Chromium and an in-process kaproxy (Apache, the demo backends and `eventually` are in
//! `kaproxy-testkit`).

#![allow(dead_code)]

pub mod backend;
pub mod binary;
pub mod chromium;
pub mod client;
pub mod config_file;
pub mod hostile;
pub mod proxy;
