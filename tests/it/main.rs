//! kaproxy's integration tests, in one binary with shared helpers under `support/`.

mod apache;
mod downstream;
mod harness;
mod proxying;
mod race;
mod support;
mod tls;
mod upgrade;
mod upstream_failures;
