//! Data parallelism on the CPU backend (ranks as threads talking TCP on loopback): a job of 2
//! or 3 ranks gives the single process's bits (same global batch), with and without ZeRO-2;
//! mismatched, missing, dead and hung ranks stop the job with the rank named; a 2-rank
//! checkpoint resumes on 1 rank.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::*;
use ferrotune_train::dist::tcp::{JobIdentity, TcpComm, TcpOptions};
use ferrotune_train::dist::RankEnv;
use ferrotune_train::metrics::{read, Record};
use ferrotune_train::trainer::{train_with, Silent};
use ferrotune_train::{checkpoint, Observer, RunData, Summary, TrainError};

fn data() -> RunData {
    let mut d = reference_data();
    d.validation = Some(d.train[..7].to_vec());
    d
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env(rank: usize, world: usize, port: u16) -> RankEnv {
    RankEnv {
        rank,
        local_rank: rank,
        world,
        local_world: world,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    }
}

fn opts(timeout_s: u64) -> TcpOptions {
    TcpOptions {
        timeout: Duration::from_secs(timeout_s),
        join_timeout: Duration::from_secs(timeout_s.max(5)),
    }
}

/// Sets the stop flag (as Ctrl-C does) once step `at` is done.
struct StopAt(u64, std::sync::Arc<std::sync::atomic::AtomicBool>);
impl Observer for StopAt {
    fn step(&mut self, step: u64, _: u64, _: f64, _: f64, _: f64) {
        if step == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
    }
}

const SETS: &[&str] = &[
    "shuffle=true",
    "seed=7",
    "eval_steps=5",
    "validation_file_path=unused",
    "save_steps=4",
    "max_steps=8",
];

/// One rank's run: the fixture model with LoRA dropout (keyed per micro-batch, so the ranks
/// must draw the masks the single process draws), `extra` settings on top of [`SETS`].
fn rank_run(
    out: &Path,
    extra: &[&str],
    comm: &mut dyn ferrotune_train::dist::Communicator,
    resume: Option<std::path::PathBuf>,
    stop_at: Option<u64>,
) -> ferrotune_train::Result<Summary> {
    let sets: Vec<&str> = SETS.iter().chain(extra).copied().collect();
    let cfg = reference_config(out, &sets);
    let (mut model, mut lora) = model_with_adapter(DType::F32);
    lora.lora_dropout = 0.1;
    model.set_lora_dropout(0.1);
    let o = options(resume);
    let mut stop = StopAt(stop_at.unwrap_or(u64::MAX), o.stop.clone());
    train_with(&cfg, &mut model, &lora, &data(), &o, &mut stop, comm)
}

fn job(
    out: &Path,
    world: usize,
    extra: impl Fn(usize) -> Vec<&'static str> + Sync,
    resume: Option<std::path::PathBuf>,
    stop_at: Option<u64>,
) -> Vec<ferrotune_train::Result<Summary>> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let extra = &extra;
                let resume = resume.clone();
                s.spawn(move || {
                    let sets = extra(rank);
                    let cfg = reference_config(
                        out,
                        &SETS.iter().chain(&sets).copied().collect::<Vec<_>>(),
                    );
                    let identity = JobIdentity {
                        version: "test".into(),
                        config_hash: cfg.training_hash_for(world),
                    };
                    let mut comm =
                        TcpComm::join(&env(rank, world, port), &identity, &opts(30), None)?;
                    rank_run(
                        out,
                        &sets,
                        &mut comm,
                        resume,
                        if rank == 0 { stop_at } else { None },
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn adapter(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut v: Vec<(String, Vec<u32>)> = t
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn losses(metrics: &Path) -> (Vec<u64>, Vec<f64>) {
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for r in read(metrics).unwrap() {
        match r {
            Record::Train(t) => train.push(t.loss.to_bits()),
            Record::Eval(e) => eval.push(e.eval_loss),
        }
    }
    (train, eval)
}

#[test]
fn two_and_three_ranks_give_the_single_process_bits_with_and_without_zero_2() {
    let single_dir = tempfile::tempdir().unwrap();
    let single = rank_run(
        single_dir.path(),
        &["gradient_accumulation_steps=6"],
        &mut ferrotune_train::dist::Solo,
        None,
        None,
    )
    .unwrap();
    let want = adapter(single.adapter.as_ref().unwrap());
    let (want_train, want_eval) = losses(&single.metrics);

    let cases: [(usize, &[&'static str]); 3] = [
        (2, &["gradient_accumulation_steps=3"]),
        (
            3,
            &[
                "gradient_accumulation_steps=2",
                "apply_deepspeed=true",
                "deepspeed_stage=2",
            ],
        ),
        (
            2,
            &[
                "gradient_accumulation_steps=3",
                "apply_deepspeed=true",
                "deepspeed_stage=1",
            ],
        ),
    ];
    for (world, extra) in cases {
        let dir = tempfile::tempdir().unwrap();
        let results = job(dir.path(), world, |_| extra.to_vec(), None, None);
        let lead = results.into_iter().map(|r| r.unwrap()).next().unwrap();
        let what = format!("{world} ranks {extra:?}");
        assert_eq!(
            adapter(lead.adapter.as_ref().unwrap()),
            want,
            "{what}: adapter bits"
        );
        let (train, eval) = losses(&lead.metrics);
        assert_eq!(
            train, want_train,
            "{what}: every logged train loss, bit for bit"
        );
        assert_eq!(eval.len(), want_eval.len());
        for (a, b) in eval.iter().zip(&want_eval) {
            // Eval sums are added per rank first: equal to f64 rounding.
            assert!(
                (a - b).abs() <= 1e-12 * b.abs(),
                "{what}: eval loss {a} vs {b}"
            );
        }
        // Only rank 0 wrote: one metrics file, checkpoints with the full optimizer state.
        let ckpt = checkpoint::path_for(dir.path(), 8);
        let moments = checkpoint::read_optimizer(&ckpt).unwrap();
        let single_moments =
            checkpoint::read_optimizer(&checkpoint::path_for(single_dir.path(), 8)).unwrap();
        assert_eq!(
            moments.len(),
            single_moments.len(),
            "{what}: every tensor's moments in the checkpoint"
        );
        for (k, t) in &single_moments {
            let got = moments[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(
                got,
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{what}: {k}"
            );
        }
    }
}

#[test]
fn a_rank_with_other_settings_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let results = job(
        dir.path(),
        2,
        |rank| {
            if rank == 1 {
                vec!["gradient_accumulation_steps=1", "learning_rate=1e-3"]
            } else {
                vec!["gradient_accumulation_steps=1"]
            }
        },
        None,
        None,
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    for (rank, r) in results.iter().enumerate() {
        let err = r
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("rank {rank} trained"));
        assert!(
            matches!(err, TrainError::Config { .. }),
            "rank {rank}: {err}"
        );
        assert!(
            err.to_string().contains("rank 1") && err.to_string().contains("config hash"),
            "rank {rank}: {err}"
        );
    }
    assert!(checkpoint::list(dir.path()).is_empty());
}

#[test]
fn missing_dead_and_hung_ranks_stop_the_job_with_the_rank_named() {
    // Rank 1 never comes.
    let started = Instant::now();
    let port = free_port();
    let id = JobIdentity {
        version: "test".into(),
        config_hash: "h".into(),
    };
    let short = TcpOptions {
        timeout: Duration::from_secs(2),
        join_timeout: Duration::from_secs(2),
    };
    let err = TcpComm::join(&env(0, 2, port), &id, &short, None)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("rank(s) 1 did not join within 2 s"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Rank 1 joins, then dies before the first step; and a rank that hangs.
    for dies in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let started = Instant::now();
        let outcome = std::thread::scope(|s| {
            let cfg = reference_config(
                dir.path(),
                &SETS
                    .iter()
                    .chain(&["gradient_accumulation_steps=1"])
                    .copied()
                    .collect::<Vec<_>>(),
            );
            let id = JobIdentity {
                version: "test".into(),
                config_hash: cfg.training_hash_for(2),
            };
            let id1 = id.clone();
            s.spawn(move || {
                let comm = TcpComm::join(&env(1, 2, port), &id1, &opts(3), None).unwrap();
                if dies {
                    drop(comm);
                } else {
                    std::thread::sleep(Duration::from_secs(8));
                    drop(comm);
                }
            });
            let mut comm = TcpComm::join(&env(0, 2, port), &id, &opts(3), None).unwrap();
            rank_run(
                dir.path(),
                &["gradient_accumulation_steps=1"],
                &mut comm,
                None,
                None,
            )
        });
        let err = outcome.expect_err("rank 0 cannot finish alone");
        let text = err.to_string();
        if dies {
            assert!(text.contains("rank 1 is gone"), "{text}");
        } else {
            assert!(text.contains("rank 1 did not answer within 3 s"), "{text}");
        }
        assert!(matches!(err, TrainError::Distributed(_)));
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "{:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_two_rank_checkpoint_resumes_on_one_rank_to_the_same_bits() {
    let whole = tempfile::tempdir().unwrap();
    let single = rank_run(
        whole.path(),
        &["gradient_accumulation_steps=4"],
        &mut ferrotune_train::dist::Solo,
        None,
        None,
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let results = job(
        dir.path(),
        2,
        |_| vec!["gradient_accumulation_steps=2"],
        None,
        Some(4),
    );
    for r in &results {
        let s = r.as_ref().unwrap();
        assert_eq!(
            (s.finish, s.steps),
            (ferrotune_train::Finish::Interrupted, 4),
            "every rank stops after the same step"
        );
    }
    let resume = checkpoint::resolve_resume("auto", dir.path()).unwrap();
    assert_eq!(resume, Some(checkpoint::path_for(dir.path(), 4)));
    let resumed = rank_run(
        dir.path(),
        &["gradient_accumulation_steps=4"],
        &mut ferrotune_train::dist::Solo,
        resume,
        None,
    )
    .unwrap();
    assert_eq!(
        adapter(resumed.adapter.as_ref().unwrap()),
        adapter(single.adapter.as_ref().unwrap())
    );
    assert_eq!(losses(&resumed.metrics).0, losses(&single.metrics).0);

    // The same per-device settings on a different world size would be another global batch.
    let err = rank_run(
        dir.path(),
        &["gradient_accumulation_steps=2"],
        &mut ferrotune_train::dist::Solo,
        checkpoint::resolve_resume("auto", dir.path()).unwrap(),
        None,
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("different training settings"),
        "{err}"
    );
    let _ = Silent;
}
