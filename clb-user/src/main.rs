//! The `clb` binary: the daemon and the CLI.

use std::{process::ExitCode, time::Duration};

use clap::Parser as _;
use clb::{
    api::client::ClientError,
    cli::{self, Cli, Command},
    daemon::{self, DaemonOptions},
    l7::access::Format,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon(args) => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let log = tracing_subscriber::fmt().with_env_filter(filter);
            match args.log_format {
                // One object per line: time, level, target, the message and its fields.
                Format::Json => log.json().flatten_event(true).with_ansi(false).init(),
                // Colour only for a person at a terminal, not in journald or a log file.
                Format::Text => log
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                    .init(),
            }
            let opts = DaemonOptions {
                config: args.config,
                init_config: args.init_config,
                ifaces: args.iface,
                xdp_mode: args.xdp_mode,
                bpffs: args.bpffs,
                api: cli.api,
                metrics: args.metrics,
                console: args.console,
                console_token_file: args.console_token_file,
                console_session_idle: Duration::from_secs(args.console_session_idle),
                sweep_interval: Duration::from_secs(args.sweep_interval),
                state_dir: args.state_dir,
                bird: args.bird,
                access_log: args.access_log,
                access_log_format: args.access_log_format,
            };
            let Some(rt) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(daemon::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                // One line, on stderr (journald records it once; before, the log's ERROR line
                // repeated it).
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Teardown { bpffs, force } => report(cli::teardown(&bpffs, force)),
        Command::Check { config } => report(cli::check(&config)),
        Command::Completions { shell } => {
            cli::completions(shell);
            ExitCode::SUCCESS
        }
        Command::Man => report(cli::man()),
        _ => {
            let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(cli::run_client(cli)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(ClientError::Refused { status, message }) => {
                    eprintln!("error: {message} (HTTP {status})");
                    ExitCode::FAILURE
                }
                Err(ClientError::Transport(e)) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds a tokio runtime, or says why it could not.
fn runtime(mut b: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match b.enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            None
        }
    }
}
