//! The backend side: each backend and its health, the balancer that picks one, the active
//! health probes, and the keep-alive-aware connection pool with the `Keep-Alive` header it
//! learns from.

pub mod backend;
pub mod balancer;
pub mod connect;
pub mod delivery;
pub mod exchange;
pub mod group;
pub mod health;
pub mod keep_alive;
pub mod pool;
pub mod stream;
pub mod tls;
pub mod wire;
