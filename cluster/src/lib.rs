//! ferry's torch-free core, shared by `ferryd` and `ferryctl`.
//!
//! # Layout
//! - [`spec`]: the job spec (v1): parsing with field-named errors, and validation.
//! - [`api`]: the REST API's types: jobs, status, events, nodes, RFC 9457 problems.
//! - [`paths`]: confining the paths of a spec to the configured roots.
//! - [`store`]: the coordination store interface (keys with revisions, leases, watches,
//!   compare-and-swap transactions) and [`store::embedded`], its single-node implementation.
//! - [`keys`]: where jobs, events and nodes live in the store.
//! - [`collective`]: all-reduce, broadcast and barrier between the ranks of a job, and
//!   [`collective::ring`], the TCP ring for CPU ranks.
//! - [`distill`]: the teacher service's wire format, server, client and soft-label cache.
//! - [`time`]: RFC 3339 timestamps.
//!
//! This crate never links libtorch: operators install `ferryctl` on a laptop.

pub mod api;
pub mod collective;
pub mod distill;
pub mod fuzz;
pub mod keys;
pub mod paths;
pub mod place;
pub mod spec;
pub mod store;
pub mod time;
