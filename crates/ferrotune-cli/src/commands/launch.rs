//! `ferrotune train --nproc-per-node N`: start N ranks of this binary on this node with the
//! variables torchrun sets, forward Ctrl-C / SIGTERM to them, and exit with the first failing
//! rank's status (stopping the others).

use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::TrainArgs;
use crate::failure::Failure;

/// Flags only the launcher reads; the ranks get everything else as it was given.
const LAUNCHER_FLAGS: [&str; 5] = [
    "--nproc-per-node",
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
];

fn rank_args() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if LAUNCHER_FLAGS.contains(&a.as_str()) {
            args.next();
            continue;
        }
        if LAUNCHER_FLAGS
            .iter()
            .any(|f| a.starts_with(&format!("{f}=")))
        {
            continue;
        }
        out.push(a);
    }
    out
}

pub fn launch(args: &TrainArgs) -> Result<(), Failure> {
    let n = args.nproc_per_node.expect("called with --nproc-per-node");
    if n == 0 || args.nnodes == 0 {
        return Err(Failure::usage(
            "--nproc-per-node and --nnodes must be at least 1",
        ));
    }
    if args.node_rank >= args.nnodes {
        return Err(Failure::usage(format!(
            "--node-rank {} must be below --nnodes {}",
            args.node_rank, args.nnodes
        )));
    }
    let port = match args.master_port {
        Some(p) => p,
        None if args.nnodes == 1 => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| Failure::runtime(format!("no free port for rank 0: {e}")))?,
        None => 29500,
    };
    let world = n * args.nnodes;
    let exe = std::env::current_exe()
        .map_err(|e| Failure::runtime(format!("cannot find this binary: {e}")))?;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let forwarded = rank_args();
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..n {
        let rank = args.node_rank * n + local;
        let mut cmd = Command::new(&exe);
        // Their own process group: a terminal's Ctrl-C reaches the launcher only, which passes
        // it on once (a second SIGINT would make a rank abort instead of checkpointing).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.args(&forwarded)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("NODE_RANK", args.node_rank.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", port.to_string());
        // CPU ranks share the cores instead of each starting a thread per core.
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", (cores / n).max(1).to_string());
        }
        if rank > 0 && std::env::var_os("FERROTUNE_LOG").is_none() {
            cmd.env("FERROTUNE_LOG", "warn");
        }
        let child = cmd
            .spawn()
            .map_err(|e| Failure::runtime(format!("starting rank {rank}: {e}")))?;
        children.push((rank, child));
    }
    tracing::info!(
        "started ranks {}..{} of {world} (rank 0 at {}:{port})",
        args.node_rank * n,
        args.node_rank * n + n - 1,
        args.master_addr
    );

    // Ctrl-C reaches the ranks through the terminal's process group; a SIGTERM or a signal sent
    // to the launcher alone is passed on.
    let pids: Vec<i32> = children.iter().map(|(_, c)| c.id() as i32).collect();
    let signalled = Arc::new(AtomicI32::new(0));
    let flag = signalled.clone();
    let _ = ctrlc::set_handler(move || {
        flag.store(1, Ordering::SeqCst);
        for &pid in &pids {
            // SAFETY: kill(2) with a pid this process started.
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
        }
    });

    let mut first_failure: Option<(usize, i32)> = None;
    let mut stop_deadline: Option<Instant> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = children.remove(i);
                    let code = status.code().unwrap_or(1);
                    if code != 0 && first_failure.is_none() {
                        first_failure = Some((rank, code));
                        if signalled.load(Ordering::SeqCst) == 0 {
                            eprintln!(
                                "rank {rank} exited with status {code}; stopping the other ranks"
                            );
                            for (_, c) in &children {
                                // SAFETY: as above.
                                unsafe {
                                    libc::kill(c.id() as i32, libc::SIGTERM);
                                }
                            }
                            stop_deadline = Some(Instant::now() + Duration::from_secs(30));
                        }
                    }
                }
                Ok(None) => i += 1,
                Err(e) => return Err(Failure::runtime(format!("waiting for a rank: {e}"))),
            }
        }
        if stop_deadline.is_some_and(|d| Instant::now() > d) {
            for (_, c) in children.iter_mut() {
                let _ = c.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        None => Ok(()),
        Some((rank, code)) => Err(Failure {
            code,
            message: format!(
                "rank {rank} of {world} failed (exit {code}); the first failure is reported"
            ),
        }),
    }
}
