//! The control floor, above the pipeline: what an operator runs and reads — the admin
//! listener and its status page with its history, configuration reload, `kaproxy probe` — and
//! the building of each configuration's [`generation`].

pub mod admin;
pub mod generation;
pub mod history;
pub mod probe;
pub mod reload;
