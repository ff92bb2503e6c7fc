//! The `ferrotune` binary: a thin shell over the library crates.
//! Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.

mod assets;
mod cli;
mod commands;
mod failure;
mod progress;

use clap::Parser;

/// Training allocates and frees large activation buffers every op; glibc hands big blocks back
/// to the kernel each time (mmap/munmap, page faults, zeroing, TLB shootdowns: ~40% of a CPU
/// training step measured with perf). mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crate::cli::{BenchCommand, Cli, Command, DataCommand};
use crate::failure::Failure;

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_) | Command::Run(_)) {
        die_quietly_on_closed_stdout();
    }
    init_logging(cli.verbose, cli.quiet);
    if let Err(failure) = dispatch(&cli) {
        eprintln!("error: {}", failure.message);
        std::process::exit(failure.code);
    }
}

/// `ferrotune models list | head` ends the way `ls | head` does instead of panicking on a
/// closed stdout: Rust ignores SIGPIPE, so the signal's default action is restored. Not for the
/// long-lived servers, which must outlive any one closed pipe. (Sockets are unaffected either
/// way: std sends with MSG_NOSIGNAL.)
fn die_quietly_on_closed_stdout() {
    // SAFETY: called first thing on the main thread, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn dispatch(cli: &Cli) -> Result<(), Failure> {
    let json = cli.json;
    match &cli.command {
        Command::Run(args) => commands::run::run(args, json),
        Command::Data(DataCommand::Prepare(args)) => commands::data::prepare(args, json),
        Command::Data(DataCommand::Inspect(args)) => commands::data::inspect(args, json),
        Command::Data(DataCommand::Stats(args)) => commands::data::stats(args, json),
        Command::Bench(BenchCommand::Data(args)) => commands::bench_data::run(args, json),
        Command::Bench(BenchCommand::Train(args)) => commands::bench_train::run(args, json),
        Command::Bench(BenchCommand::Serve(args)) => commands::bench_serve::run(args, json),
        Command::Bench(BenchCommand::Decode(args)) => commands::bench_decode::run(args, json),
        Command::Bench(BenchCommand::Attention(args)) => commands::bench_attention::run(args, json),
        Command::Train(args) => commands::train::run(args, json),
        Command::Eval(args) => commands::eval::run(args, json),
        Command::Generate(args) => commands::generate::run(args, json),
        Command::Plan(args) => commands::plan::run(args, json),
        Command::Export(args) => commands::export::run(args, json),
        Command::Models(args) => commands::models::run(args, json),
        Command::Serve(args) => commands::serve::run(args),
        Command::Invoke(args) => commands::invoke::run(args, json),
        Command::Azure(args) => commands::azure::run(args, json),
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERROTUNE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
