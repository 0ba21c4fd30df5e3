//! The `runfleet` command line and client library.
//!
//! The binary is thin (`main.rs`); everything here is testable: the API
//! [`client`], layered [`config`], the server commands ([`serve`]), the
//! embedded single-machine fleet ([`dev`]), the [`bench`]mark and the
//! [`chaos`] harness.

pub mod bench;
pub mod chaos;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod embedded;
pub mod serve;
