//! The control floor, above the pipeline: what an operator runs and reads — the admin
//! listener and its status page with its history, per-server control ([`servers`]) and the
//! client `kaproxy server` talks to it with ([`admin_client`]), configuration reload, the
//! re-resolution of server names ([`resolve`]), `kaproxy probe` — and the building of each configuration's [`generation`].

pub mod admin;
pub mod admin_client;
pub mod generation;
pub mod history;
pub mod probe;
pub mod reload;
pub mod resolve;
pub mod servers;
