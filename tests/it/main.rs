//! kaproxy's integration tests, in one binary with shared helpers under `support/`.

mod apache;
mod downstream;
mod harness;
mod race;
mod support;
mod tls;
