#!/usr/bin/env python3
"""CI check: a `ferrotune train` run arrives intact in a real MLflow tracking server.

Starts `mlflow server` (SQLite backend, artifact proxy on) on a free local port, trains the tiny
fixture model for a few steps with MLFLOW_TRACKING_URI pointing at it, then reads the run back
with MLflow's own Python client and compares it with the run's metrics.jsonl: status, run name,
every config key as a param, the tags, the full history of every metric (values and steps, exact),
and the uploaded artifacts (adapter, config, metrics, plot). Then the registry: the run is
exported, registered locally, aliased and pushed with `ferrotune models push`, and the version is
read back (linked to the training run, lineage tags, alias, every file identical after download).

Run (from the repo root, after `cargo build`):
    python scripts/check_mlflow_run.py --ferrotune target/debug/ferrotune
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import mlflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(uri, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise SystemExit("mlflow server did not come up")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferrotune", default=os.path.join(ROOT, "target/debug/ferrotune"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ferrotune-mlflow-")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
         "--artifacts-destination", f"{work}/artifacts", "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(f"{work}/server.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_up(uri, server)
        fixtures = os.path.join(ROOT, "fixtures")
        cfg = os.path.join(work, "train.yaml")
        with open(cfg, "w") as f:
            f.write(f"""model: {fixtures}/models/tiny_phi3_chat
train_file_path: {fixtures}/ultrachat_sample/hf
validation_file_path: {fixtures}/ultrachat_sample/hf
max_steps: 9
per_device_train_batch_size: 4
learning_rate: 5.0e-3
lr_scheduler_type: cosine
warmup_ratio: 0.1
logging_steps: 2
eval_steps: 3
device: cpu
output_dir: {work}/out
experiment_name: ferrotune-ci
""")
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
        subprocess.run([args.ferrotune, "train", "--config", cfg], check=True, env=env)

        records = [json.loads(line) for line in open(f"{work}/out/metrics.jsonl")]
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name("ferrotune-ci")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1, f"expected one run, found {len(runs)}"
        run = runs[0]
        assert run.info.status == "FINISHED", run.info.status
        assert run.info.run_name == "tiny_phi3_chat-ultrachat-bs4-cosine-nods-lora-save_limit-1-seqlen-1", run.info.run_name
        params = run.data.params
        assert params["learning_rate"] == "0.005" and params["max_steps"] == "9", params
        assert params["lr_scheduler_type"] == "cosine", params
        assert len(params) >= 40, f"only {len(params)} params"
        tags = run.data.tags
        for t in ["ferrotune.config_hash", "ferrotune.data_cache_key", "mlflow.source.git.commit"]:
            assert tags.get(t), f"tag {t} missing"
        checks = {"train": ["loss", "learning_rate", "grad_norm", "epoch"],
                  "eval": ["eval_loss", "eval_perplexity", "eval_accuracy"]}
        compared = 0
        for kind, keys in checks.items():
            mine = [r for r in records if r["type"] == kind]
            for key in keys:
                history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                want = [(r["step"], r[key]) for r in mine if r[key] is not None]
                assert history == want, f"{key}: MLflow {history} vs metrics.jsonl {want}"
                compared += len(want)
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        arts |= {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
        for a in ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "train_config.yaml",
                  "metrics.jsonl", "loss.svg"]:
            assert a in arts, f"artifact {a} missing: {sorted(arts)}"
        print(f"mlflow check ok: run {run.info.run_id}, {len(params)} params, {compared} metric points "
              f"identical to metrics.jsonl, {len(arts)} artifacts")
        check_registry_push(args.ferrotune, work, uri, client, run)
    finally:
        server.terminate()
        server.wait(timeout=30)


def check_registry_push(ferrotune, work, uri, client, run):
    """Export the run, register it locally, push it to the server's model registry, and read
    the version back with MLflow's client: linked to the training run, lineage as tags, the alias
    carried over, every exported file downloadable and MLmodel readable by MLflow."""
    env = dict(os.environ, FERROTUNE_HOME=f"{work}/home")
    export = f"{work}/export"
    subprocess.run([ferrotune, "export", "--checkpoint", f"{work}/out", "--out", export], check=True, env=env)
    reg = json.loads(subprocess.run(
        [ferrotune, "--json", "models", "register", "--path", export, "--name", "tiny-ci", "--tag", "team=ci"],
        check=True, env=env, capture_output=True, text=True).stdout)
    assert reg["lineage"]["training_run_id"] == run.info.run_id, reg["lineage"]
    subprocess.run([ferrotune, "models", "alias", "tiny-ci", "prod", str(reg["version"])], check=True, env=env)
    pushed = json.loads(subprocess.run(
        [ferrotune, "--json", "models", "push", "tiny-ci@prod", "--to", uri],
        check=True, env=env, capture_output=True, text=True).stdout)
    assert pushed["training_run"], pushed
    mv = client.get_model_version("tiny-ci", pushed["version"])
    assert mv.status == "READY", mv.status
    assert mv.run_id == run.info.run_id, (mv.run_id, run.info.run_id)
    assert mv.tags["ferrotune.local_version"] == str(reg["version"]), mv.tags
    assert mv.tags["ferrotune.lineage.data_cache_key"] == run.data.tags["ferrotune.data_cache_key"], mv.tags
    assert mv.tags["team"] == "ci", mv.tags
    assert client.get_registered_model("tiny-ci").aliases == {"prod": pushed["version"]}
    mlflow.set_registry_uri(uri)
    dst = mlflow.artifacts.download_artifacts("models:/tiny-ci@prod", dst_path=f"{work}/download",
                                             tracking_uri=uri)
    mine = sorted(os.path.relpath(os.path.join(d, f), export) for d, _, fs in os.walk(export) for f in fs)
    theirs = sorted(os.path.relpath(os.path.join(d, f), dst) for d, _, fs in os.walk(dst) for f in fs
                    if f != "registered_model_meta")
    assert mine == theirs, (mine, theirs)
    for f in mine:
        assert open(os.path.join(export, f), "rb").read() == open(os.path.join(dst, f), "rb").read(), f
    model = mlflow.models.Model.load(os.path.join(dst, "MLmodel"))
    assert set(model.flavors) == {"python_function", "transformers"}, model.flavors
    assert model.metadata["task"] == "llm/v1/chat"
    print(f"registry check ok: tiny-ci:{reg['version']} pushed as version {mv.version}, linked to the "
          f"training run, {len(mine)} files identical after the round trip")


if __name__ == "__main__":
    main()
