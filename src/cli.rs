//! The command line: subcommands, the `-conf` flag spelt as the Go service took it, and
//! exit statuses.

use std::{ffi::OsString, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::publish::PublishArgs;

/// Exit status for any other failure (a migration, a server that failed).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status for bad usage or configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status when a dependency cannot be reached at start-up (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit status when the snowflake node lease was lost: start again (EX_TEMPFAIL).
pub const EXIT_LEASE_LOST: u8 = 75;

/// Manages cloud compute instances over gRPC, REST and RabbitMQ events.
#[derive(Debug, Parser)]
#[command(name = "resource", version, about)]
pub struct Cli {
    /// Directory of *.yaml configuration files (also `-conf DIR`, as the Go service took).
    #[arg(
        short = 'c',
        long = "conf",
        value_name = "DIR",
        default_value = "./configs",
        global = true
    )]
    pub conf: PathBuf,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC and REST servers (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Publish the seed's sample event, events from a JSON file, or generated events.
    Publish(PublishArgs),
    /// Print the version and exit.
    Version,
}

impl Cli {
    /// Parses `args` (the program name first), Go flag spellings included.
    ///
    /// # Errors
    /// Bad usage, or `--help` / `--version` (print the error; see `use_stderr`).
    pub fn parse_args(args: impl Iterator<Item = OsString>) -> Result<Self, clap::Error> {
        Self::try_parse_from(go_style_args(args))
    }
}

/// Rewrites the Go flag spelling `-conf DIR` / `-conf=DIR` to `--conf`, so operators'
/// scripts and the old Dockerfile keep working.
pub fn go_style_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    args.map(|arg| match arg.to_str() {
        Some("-conf") => OsString::from("--conf"),
        Some(s) if s.starts_with("-conf=") => OsString::from(format!("-{s}")),
        _ => arg,
    })
    .collect()
}
