//! The `erpgate` command: `run` the proxy or `check` a config file.
#![forbid(unsafe_code)]

/// mimalloc: in one run of benches/load.sh it gave about 30 % more requests per second than
/// glibc malloc (README "Performance"), for some more memory at rest.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status for a bad configuration: 64 (sysexits' EX_USAGE), as linkerd does.
const EXIT_BAD_CONFIG: u8 = 64;
/// Exit status when a listen address cannot be bound (sysexits' EX_OSERR).
const EXIT_CANNOT_LISTEN: u8 = 71;

#[derive(Parser)]
#[command(
    name = "erpgate",
    version,
    about = "Edge ingress proxy for Odoo ERP traffic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The TOML config file.
        #[arg(short, long, default_value = "config/erpgate.toml")]
        config: PathBuf,
        /// Take over the listening sockets of a running erpgate (zero-downtime binary upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Check a config file: print every error as file:line:col: key.path: message.
    Check {
        #[arg(short, long, default_value = "config/erpgate.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match erpgate::config::load(&config) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} classes, {} pools)",
                    config.display(),
                    cfg.classes.len(),
                    cfg.pools.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Run { config, upgrade } => match erpgate::config::load(&config) {
            Ok(cfg) => {
                erpgate::server::init_logging(&cfg.log);
                if !upgrade {
                    if let Err(e) = erpgate::server::check_listeners(&cfg) {
                        eprintln!("erpgate: not started: {e}");
                        return ExitCode::from(EXIT_CANNOT_LISTEN);
                    }
                }
                erpgate::server::run(cfg, &config, upgrade)
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!(
                    "erpgate: not started: {} error(s) in {}",
                    errors.0.len(),
                    config.display()
                );
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
    }
}
