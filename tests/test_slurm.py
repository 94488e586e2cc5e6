"""launch/slurm/ against a real SLURM (slurmctld + slurmd + munge on loopback, brought up by
scripts/slurm_local.sh): a job of two CPU ranks trains and finishes; a job warned with SIGUSR1
mid-training checkpoints, requeues itself, resumes, and ends where an uninterrupted job ends; a
signal before training starts requeues the job; a refused requeue fails it with the reason.

Bringing SLURM up installs packages and writes /etc/slurm/slurm.conf, so these tests run only
when asked: MMVAE_TEST_SLURM=1 (.ci/run sets it) or CI=true; skipped with that reason otherwise,
and also where SLURM cannot be installed or started (no root, no apt)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
JOB_TIMEOUT = 120  # seconds for one job (a start takes ~10 s here)

ENABLED = os.environ.get("MMVAE_TEST_SLURM") == "1" or os.environ.get("CI") == "true"
pytestmark = [
    pytest.mark.slurm, pytest.mark.slow,
    pytest.mark.timeout(1800),  # the first start installs SLURM (apt)
    pytest.mark.skipif(not ENABLED, reason="SLURM tests install and start slurmctld/slurmd/munge "
                                           "(apt, /etc/slurm): set MMVAE_TEST_SLURM=1 (CI=true "
                                           "does too) to run them"),
]


@pytest.fixture(scope="session")
def slurm():
    """The local cluster; stopped at the end only if this fixture started it."""
    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("SLURM is not installed and cannot be (needs root and apt-get)")
    started = subprocess.run([SCRIPT, "status"], capture_output=True).returncode != 0
    if started:
        up = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            reason = (up.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"SLURM cannot be brought up: {reason}")
    yield
    if started:
        subprocess.run([SCRIPT, "down"], capture_output=True, timeout=120)



def train_args(shards, run_dir, *extra):
    return ["--config", "configs/demo.yaml", f"data.shards={shards}", "data.builtin=",
            f"run.dir={run_dir}", "logging.wandb=disabled", "logging.progress=false",
            "data.batch_size=4", "model.latent_dim=4", "objective.K=2", "train.test_batches=1",
            "train.log_every=1", "train.epochs=20", "train.max_steps=12", *extra]


def job_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update({"WANDB_MODE": "disabled", "MMVAE_CPU_PROCS": "2", "MMVAE_PYTHON": sys.executable,
                "MMVAE_ROOT": str(ROOT), "COLUMNS": "300", **extra})
    return env


class Job:
    """A submitted batch job; cancelled when the test ends, whatever happened."""

    def __init__(self, script: str, args: list[str], log_dir: Path, sbatch_opts=(), **env):
        out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2",
                              "--job-name=mmvae-test", f"--output={log_dir}/slurm-%j.out",
                              *sbatch_opts,
                              str(ROOT / "launch" / "slurm" / script), *args],
                             cwd=ROOT, env=job_env(**env), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        self.id = out.stdout.strip().split(";")[0]
        self.log = log_dir / f"slurm-{self.id}.out"

    def info(self) -> dict:
        """`scontrol show job` as a dict (no accounting database here: no sacct)."""
        text = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True,
                              text=True).stdout
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def queued(self) -> bool:
        return bool(subprocess.run(["squeue", "-h", "-j", self.id], capture_output=True,
                                   text=True).stdout.strip())

    def wait_until(self, condition, what: str, timeout: float = JOB_TIMEOUT):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"job {self.id}: no {what} in {timeout} s\n" \
                                                f"{self.output()}"
            time.sleep(0.25)

    def wait_done(self, timeout: float = JOB_TIMEOUT) -> dict:
        self.wait_until(lambda: not self.queued(), "end", timeout)
        return self.info()

    def output(self) -> str:
        return self.log.read_text() if self.log.is_file() else "(no output)"

    def cancel(self):
        subprocess.run(["scancel", self.id], capture_output=True)


@pytest.fixture
def jobs():
    started = []
    yield lambda *args, **kwargs: started.append(Job(*args, **kwargs)) or started[-1]
    for job in started:
        job.cancel()


def train_events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, tmp_path_factory):
    """train.sbatch: one node, two CPU ranks, trains 12 steps and finishes."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    job = Job("train.sbatch", train_args(shards, tmp / "run"), tmp)
    try:
        info = job.wait_done()
    finally:
        job.cancel()
    return job, info, tmp / "run"


def test_two_rank_job_trains_and_finishes(uninterrupted):
    job, info, run_dir = uninterrupted
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.output()
    assert info["Restarts"] == "0"
    assert "1 node(s) x 2 process(es)" in job.output()
    assert "2 process(es), P=1" in job.output()  # one world of two ranks, not two of one
    assert (run_dir / "model" / "weights.pt").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 12
    steps = [e["step"] for e in train_events(run_dir) if e["split"] == "train"]
    assert steps == list(range(1, 13))


def test_a_signal_before_training_starts_requeues_the_job_instead_of_killing_it(
        slurm, shards, tmp_path, jobs):
    # A Python that holds its first call (the batch shell's port probe) for a few seconds: the
    # window in which SLURM's warning used to kill the batch shell.
    probe = tmp_path / "probe-started"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/bash\nif [[ ! -e {probe} ]]; then touch {probe}; sleep 5; fi\n"
                      f"exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    run_dir = tmp_path / "run"
    job = jobs("train.sbatch", train_args(shards, run_dir), tmp_path, MMVAE_PYTHON=str(python))
    job.wait_until(probe.exists, "port probe")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
    job.wait_until(lambda: (lambda i: (i.get("Restarts"), i.get("JobState")))(job.info())
                   == ("1", "PENDING"), "requeue")
    log = job.output()
    assert "SIGUSR1 before training started; requeueing job" in log, log
    assert not (run_dir / "checkpoints").exists()  # no training was started


def test_a_refused_requeue_fails_the_job_with_the_reason(slurm, shards, tmp_path, jobs):
    run_dir = tmp_path / "run"
    job = jobs("train.sbatch", train_args(shards, run_dir), tmp_path, ["--no-requeue"])
    metrics = run_dir / "metrics.jsonl"
    job.wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2,
                   "training step")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
    info = job.wait_done()
    log = job.output()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", log
    assert f"scontrol requeue {job.id} failed (" in log and f"run.dir={run_dir}" in log, log
    assert (run_dir / "checkpoints" / "latest").is_file()  # the checkpoint is kept


def test_signalled_job_checkpoints_requeues_and_ends_like_an_uninterrupted_one(
        uninterrupted, shards, tmp_path, jobs):
    _, _, reference = uninterrupted
    run_dir = tmp_path / "run"
    job = jobs("train_multinode.sbatch", train_args(shards, run_dir, "logging.wandb=offline"),
               tmp_path, ["--nodes=1"], WANDB_MODE="offline")
    metrics = run_dir / "metrics.jsonl"
    job.wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2,
                   "training step")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
    # the batch shell forwards USR1 to the ranks, which checkpoint; then it requeues the job
    job.wait_until(lambda: (lambda i: (i.get("Restarts"), i.get("JobState")))(job.info())
                   == ("1", "PENDING"), "requeue")
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text())
    assert 2 <= stopped_at < 12 and not (run_dir / "summary.json").exists()
    # restart now instead of after the requeue delay; a start in the same second as the
    # requeue is refused ("job credential revoked")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"], check=True)
    info = job.wait_done()
    log = job.output()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert log.count("signal 10: checkpointing after this step") == 2, log  # both ranks
    assert "requeueing job" in log and "(restart 1)" in log
    assert f"resuming from {run_dir}/checkpoints/{stopped_at:09d}" in log
    # the same W&B run continued: two offline segments with the run id kept in the run folder
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2

    got, want = train_events(run_dir), train_events(reference)
    assert [(e["step"], e["split"]) for e in got] == [(e["step"], e["split"]) for e in want]
    for g, w in zip(got, want):
        for key, value in w.items():
            assert g[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float)
                              else value), (key, g, w)
    want_w = torch.load(reference / "model" / "weights.pt", weights_only=True)
    got_w = torch.load(run_dir / "model" / "weights.pt", weights_only=True)
    assert got_w.keys() == want_w.keys()
    for name, value in want_w.items():
        torch.testing.assert_close(got_w[name], value, rtol=1e-5, atol=1e-6, msg=name)
