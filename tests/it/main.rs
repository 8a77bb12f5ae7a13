//! kaproxy's integration tests, in one binary with shared helpers under `support/`.

mod apache;
mod apache_buffering;
mod buffering;
mod downstream;
mod drain;
mod flood;
mod harness;
mod hostile;
mod hostile_paths;
mod layout;
mod logs;
mod ops;
mod parking;
mod probe_apache;
mod properties;
mod proxy_protocol;
mod proxying;
mod race;
mod reload;
mod sni;
mod support;
mod tls;
mod upgrade;
mod upstream_failures;
mod upstream_tls;
mod workers;
