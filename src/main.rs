//! The `erpgate` command: `run` the proxy or `check` a config file.
#![forbid(unsafe_code)]

/// mimalloc: in benches/load.sh it serves about 30 % more requests per second than glibc
/// malloc. With its default options it commits memory ahead and keeps freed memory, which
/// costs idle WebSockets 165 KiB each instead of 50-58 KiB (benches/idle_memory.rs): see
/// [`tune_allocator`].
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc options erpgate runs with unless the environment sets them: commit arena memory
/// as it is used, not ahead (idle after start: 11 MiB instead of 25 MiB), and give freed
/// memory back to the system 10 ms after it is freed (mimalloc's default keeps it until the
/// heap is busy again: 3,000 closed connections left 54 MiB resident instead of 29 MiB).
/// Not at once (`MIMALLOC_PURGE_DELAY=0`): that held no connection in less memory and cost
/// a tenth of the requests per second (peers.sh, one run: 25.0k against 27.3k req/s), since
/// every purge is an madvise whose TLB flush interrupts the other cores (2 % of erpgate's
/// CPU time in `perf`). mimalloc reads its options from the environment when the process
/// starts, before `main`, so erpgate starts itself again (the same process, `exec`) with
/// them set.
const ALLOCATOR_OPTIONS: [(&str, &str); 2] = [
    ("MIMALLOC_PURGE_DELAY", "10"),
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
];

fn tune_allocator() {
    use std::os::unix::process::CommandExt;
    if ALLOCATOR_OPTIONS
        .iter()
        .all(|(k, _)| std::env::var_os(k).is_some())
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1));
    for (k, v) in ALLOCATOR_OPTIONS {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    // Only returns if the exec failed: then run on with mimalloc's defaults.
    let e = cmd.exec();
    eprintln!("erpgate: could not apply allocator options ({e}); running with the defaults");
}

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
    tune_allocator();
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
                        erpgate::server::flush_logs();
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
