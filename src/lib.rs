//! The messaging service: configuration, start-up, store wiring, HTTP API and workers.

pub mod clock;
pub mod config;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod process_managers;
pub mod providers;
pub mod startup;
pub mod store;
pub mod webhooks;
