"""Two "nodes" on 127.0.0.1, one process each, with the K particles split across them
(parallel.particle_shards=2), train as one process does.

Each node is its own `accelerate launch --num_machines 2 --machine_rank R --main_process_ip
127.0.0.1 --main_process_port PORT` (static rendezvous over gloo): the command that
launch/slurm/job.sh runs on every node of a train_multinode.sbatch job, with SLURM_NODEID as
the machine rank and the first node as main address.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
TIMEOUT = 300
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), COLUMNS="300")
    return env


def train_args(shards, run_dir, *extra) -> list[str]:
    return [str(ROOT / "launch" / "train.py"), "--config", str(DEMO), f"data.shards={shards}",
            "data.builtin=", f"run.dir={run_dir}", "logging.wandb=disabled",
            "logging.progress=false", "data.batch_size=4", "model.latent_dim=4", "objective.K=4",
            "train.test_batches=1", "train.log_every=1", "train.checkpoint_every=0",
            f"train.max_steps={STEPS}", "train.epochs=1", *extra]


def node_cmd(machine_rank: int, port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model" / "weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    ref = subprocess.run([sys.executable, *train_args(shards, out / "one")], cwd=ROOT,
                         env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    port = free_port()
    args = train_args(shards, out / "two", "parallel.particle_shards=2")
    nodes = [subprocess.Popen(node_cmd(r, port) + args, cwd=ROOT, env=clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for r, (node, (_, err)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {r}: {err[-3000:]}"
    return out / "one", out / "two", outputs[0][1]


def test_two_nodes_with_particle_shards_across_them_train_as_one_process(runs):
    one, two, node0_log = runs
    assert "2 process(es), P=2" in node0_log  # both nodes joined one particle group
    got, want = events(two), events(one)
    assert [(e["step"], e["split"]) for e in got] == [(e["step"], e["split"]) for e in want]
    assert sum(e["split"] == "train" for e in want) == STEPS
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key, value in w.items():
            assert g[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float)
                              else value), (key, g, w)
    # Adam's first steps are ~lr*sign(g): a gradient within rounding of zero may flip and move
    # its parameter by ~lr, so the weights are held to "almost all within 1e-5".
    want_w, got_w = weights(one), weights(two)
    assert got_w.keys() == want_w.keys()
    far = sum(int(((got_w[k].float() - v.float()).abs() > 1e-5).sum()) for k, v in want_w.items())
    total = sum(v.numel() for v in want_w.values())
    assert far / total <= 1e-3, f"{far} of {total} weights differ by more than 1e-5"
