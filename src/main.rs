use std::process::ExitCode;

use clap::Parser;
use runfleet::cli::{self, Cli, Command};
use runfleet::{bench, chaos, dev, serve};

/// mimalloc rather than the system allocator: a run's path allocates and
/// frees many small buffers (subjects, headers, encoded events, replies) on
/// two threads, which glibc's malloc spent about a third of the process's
/// CPU on under the throughput benchmark (`docs/performance.md`). Wrapped
/// for heap accounting, which counts only with `RUNFLEET_HEAP_ACCOUNTING=1`.
#[global_allocator]
static ALLOCATOR: runfleet_ops::heap::Counting<mimalloc::MiMalloc> =
    runfleet_ops::heap::Counting::new(mimalloc::MiMalloc);

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn main() -> ExitCode {
    match runfleet_ops::runtime::build() {
        Ok(runtime) => runtime.block_on(run()),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    runfleet_ops::heap::enable_from_env();
    let cli = Cli::parse();
    let config = cli.config.as_deref();
    let result = match cli.command {
        Command::Coordinator(args) => serve::coordinator(config, args).await.map(|()| ExitCode::SUCCESS),
        Command::Worker(args) => serve::worker(config, args).await.map(|()| ExitCode::SUCCESS),
        Command::Dev(args) => {
            init_tracing();
            dev::run(config, args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(args) => bench::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Chaos(args) => chaos::main(args).await,
        Command::Submit(args) => cli::submit(args, config).await,
        Command::Get(args) => cli::get(args, config).await,
        Command::List(args) => cli::list(args, config).await,
        Command::Watch(args) => cli::watch(args, config).await,
        Command::Signal(args) => cli::signal(args, config).await,
        Command::Approve(args) => cli::approve(args, config).await,
        Command::Reject(args) => cli::reject(args, config).await,
        Command::Cancel(args) => cli::cancel(args, config).await,
        Command::Workers(args) => cli::workers(args, config).await,
    };
    cli::finish_telemetry().await;
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
