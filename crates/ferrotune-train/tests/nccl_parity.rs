//! NCCL on one GPU against the CPU backend (run by scripts/gpu-check.sh from a `--nccl` build):
//! a one-rank all-reduce returns its input, and training steps through `NcclComm` give what a
//! single process gives, to fp32 rounding.
#![cfg(feature = "nccl")]

mod common;

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use common::*;
use ferrotune_train::dist::nccl::{new_id, NcclComm};
use ferrotune_train::dist::tcp::{JobIdentity, TcpComm, TcpOptions};
use ferrotune_train::dist::{Communicator, RankEnv, Solo};
use ferrotune_train::trainer::{train_with, Silent};

fn one_rank(device: &Device) -> NcclComm {
    let env = RankEnv {
        rank: 0,
        local_rank: 0,
        world: 1,
        local_world: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: 0,
    };
    let id = JobIdentity {
        version: "test".into(),
        config_hash: "h".into(),
    };
    let opts = TcpOptions {
        timeout: Duration::from_secs(30),
        join_timeout: Duration::from_secs(30),
    };
    let tcp = TcpComm::join(&env, &id, &opts, Some(new_id().unwrap())).unwrap();
    NcclComm::join(tcp, device).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU and libnccl.so.2 (scripts/gpu-check.sh)"]
fn one_rank_nccl_reduces_and_trains_like_one_process() {
    let device = Device::new_cuda(0).unwrap();
    let mut comm = one_rank(&device);
    let a = Tensor::arange(0f32, 1000.0, &device)
        .unwrap()
        .reshape((10, 100))
        .unwrap();
    let b = Tensor::ones((7,), DType::F32, &device).unwrap();
    let mut ts = vec![a.clone(), b.clone()];
    comm.all_reduce_sum(&mut ts).unwrap();
    let diff = (ts[0].clone() - a)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    assert_eq!(ts[1].to_vec1::<f32>().unwrap(), vec![1.0; 7]);

    let run = |comm: &mut dyn Communicator, out: &std::path::Path| {
        let cfg = reference_config(out, &["max_steps=4"]);
        let (mut model, lora) = model_with_adapter_on(DType::F32, &device);
        train_with(
            &cfg,
            &mut model,
            &lora,
            &reference_data(),
            &options(None),
            &mut Silent,
            comm,
        )
        .unwrap()
    };
    let (x, y) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_nccl = run(&mut comm, x.path());
    let alone = run(&mut Solo, y.path());
    let load = |s: &ferrotune_train::Summary| {
        candle_core::safetensors::load(
            s.adapter
                .as_ref()
                .unwrap()
                .join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
    };
    let (p, q) = (load(&with_nccl), load(&alone));
    for (k, t) in &p {
        let d = max_abs(&(t - &q[k]).unwrap());
        let m = max_abs(&q[k]);
        assert!(d <= 1e-6 * m.max(1e-6), "{k}: {d} (max {m})");
    }
}
