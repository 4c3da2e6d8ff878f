//! Integration tests: one binary, a fresh PostgreSQL database per test, the real service on
//! port 0, driven over HTTP as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod automation;
mod cli;
mod faults;
mod helpers;
mod messages;
mod operability;
mod providers;
mod queries;
mod readme;
mod scheduling;
mod sending;
mod services;
mod tailing;
mod webhooks;
