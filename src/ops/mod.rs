//! What an operator runs and reads: the metrics registry, the admin listener and its status
//! page with its history, configuration reload, and `kaproxy probe`.

pub mod admin;
pub mod history;
pub mod metrics;
pub mod probe;
pub mod reload;
