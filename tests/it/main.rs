//! kaproxy's integration tests, in one binary with shared helpers under `support/`.

mod harness;
mod support;
