"""Exact resume and the trainer's guards: SIGKILL + `--resume auto` equals an uninterrupted run
(bit-exact on one process, also under DeepSpeed ZeRO-2 in fp32 and bf16; within float tolerance
on two); `--resume auto` falls back past damaged checkpoints and never starts over by accident;
checkpoints survive failed writes; non-finite steps are skipped and stop the run, fp16 overflows
are skipped by the grad scaler and counted apart; bad run folders, mismatched checkpoints and W&B
trouble give clear messages instead of lost work."""
import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch

from mmvae.config import load_config
from mmvae.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
TIMEOUT = 240



def overrides(shards, run_dir, *extra):
    return [f"data.shards={shards}", "data.builtin=", f"run.dir={run_dir}",
            "logging.wandb=disabled", "logging.progress=false", "data.batch_size=4",
            "model.latent_dim=4", "objective.K=2", "train.test_batches=1", "train.log_every=1",
            "train.checkpoint_every=1", "train.epochs=20", *extra]


def train_main(argv: list[str]) -> int:
    """mmvae.cli.train.main (what launch/train.py runs), in this process."""
    return importlib.import_module("mmvae.cli.train").main(argv)


def clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), COLUMNS="300",
               DS_ACCELERATOR="cpu")
    return env


def train_cmd(nproc: int, *args) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                     str(nproc), "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no", "--main_process_port", "0"]
    return [*launcher, str(ROOT / "launch" / "train.py"), "--config", str(DEMO), *args]


def deepspeed_cmd(*args) -> list[str]:
    """One CPU process through accelerate's DeepSpeed plugin (ZeRO-2)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1",
            "--main_process_port", "0", str(ROOT / "launch" / "train.py"), "--config", str(DEMO),
            *args]


def run_training(nproc: int, *args, cmd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd or train_cmd(nproc, *args), cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text()) if pointer.is_file() else -1


def last_event_step(run_dir: Path) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if run_dir.exists() else []
    try:
        return json.loads(lines[-1])["step"] if lines else -1
    except json.JSONDecodeError:  # a line being written
        return -1


def kill_after_checkpoint(nproc: int, run_dir: Path, step: int, *args, cmd=None) -> int:
    """Start a run; SIGKILL its whole process tree (launcher and ranks, as a node failure would)
    once `latest` names a checkpoint at `step` or later and metrics.jsonl already holds a step
    past it (which the resumed run must not repeat). Returns the checkpoint's step."""
    proc = subprocess.Popen(cmd or train_cmd(nproc, *args), cwd=ROOT, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not step <= latest_step(run_dir) < last_event_step(run_dir):
            assert proc.poll() is None, f"ended before step {step}: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.01)
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for p in tree:
            p.kill()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed"
    return latest_step(run_dir)


def events(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock rate."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model" / "weights.pt", weights_only=True)


# --- SIGKILL and resume ------------------------------------------------------------------------

# checkpoints at 3, 6, 7 (end of epoch 0: a test event) and 9; killed during step 4 or 5
STEPS_1 = ["train.max_steps=9", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted one-process run."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_training(1, *overrides(shards, run_dir, *STEPS_1))
    return run_dir


def test_killed_and_resumed_run_is_bit_exact_on_one_process(shards, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(shards, run_dir, *STEPS_1)
    resumed_at = kill_after_checkpoint(1, run_dir, 3, *args)
    assert 3 <= resumed_at < 9
    proc = run_training(1, "--resume", "auto", *args)
    assert f"resuming from {run_dir / 'checkpoints'}" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"done: {run_dir}"
    # every event once, in order, with the same values: the killed run's events past its
    # checkpoint were dropped and written again by the resumed run
    assert events(run_dir) == events(reference)
    want = weights(reference)
    got = weights(run_dir)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_killed_and_resumed_run_matches_on_two_processes(shards, tmp_path):
    steps = ["train.max_steps=5", "train.checkpoint_every=2"]  # 3 steps per epoch on two ranks
    reference = tmp_path / "ref"
    run_training(2, *overrides(shards, reference, *steps))
    run_dir = tmp_path / "run"
    args = overrides(shards, run_dir, *steps)
    resumed_at = kill_after_checkpoint(2, run_dir, 2, *args)
    assert 2 <= resumed_at < 5
    run_training(2, "--resume", "auto", *args)
    got, want = events(run_dir), events(reference)
    assert [(e["step"], e["split"]) for e in got] == [(e["step"], e["split"]) for e in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key, value in w.items():
            assert g[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float)
                              else value), (key, g, w)
    want_w, got_w = weights(reference), weights(run_dir)
    for name, value in want_w.items():
        torch.testing.assert_close(got_w[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_killed_and_resumed_deepspeed_zero2_run_is_exact(shards, tmp_path, precision):
    """ZeRO-2 through accelerate (one CPU process; ops JIT-compile on first use): the engine
    saves and loads its own shards through accelerator.save_state/load_state. Under bf16 the
    engine holds bf16 weights (accelerate's autocast does nothing there; the trainer's autocast
    casts the fp32 inputs, noise and latents at each layer) and the final model holds the fp32
    master weights. Same events and weights as an uninterrupted run."""
    steps = ["train.max_steps=5", "train.checkpoint_every=2",
             *(["train.mixed_precision=bf16"] if precision == "bf16" else [])]
    reference = tmp_path / "ref"
    run_training(1, cmd=deepspeed_cmd(*overrides(shards, reference, *steps)))
    run_dir = tmp_path / "run"
    args = overrides(shards, run_dir, *steps)
    resumed_at = kill_after_checkpoint(1, run_dir, 2, cmd=deepspeed_cmd(*args))
    assert 2 <= resumed_at < 5
    assert (run_dir / "checkpoints" / f"{resumed_at:09d}" / "pytorch_model").is_dir()
    proc = run_training(1, cmd=deepspeed_cmd("--resume", "auto", *args))
    assert f"resuming from {run_dir / 'checkpoints'}" in proc.stderr
    assert events(run_dir) == events(reference)
    assert not any(e.get("skipped") for e in events(reference))  # the engine applied every step
    want, got = weights(reference), weights(run_dir)
    for name, value in want.items():
        assert value.dtype == torch.float32 and torch.equal(got[name], value), name
    if precision == "bf16":  # fp32 masters, not the engine's bf16 copies
        assert any((v != v.bfloat16().float()).any() for v in want.values())


def test_checkpoint_of_another_model_names_the_mismatch(shards, reference, tmp_path, capsys):
    code = train_main(["--config", str(DEMO), "--resume", str(reference),
                       *overrides(shards, reference, "model.latent_dim=6")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: checkpoint") and "latent_dim': (4, 6)" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


# --- resume never starts over by accident ------------------------------------------------------

@pytest.fixture(scope="module")
def four_steps(shards, tmp_path_factory):
    """A run stopped after 4 steps with a checkpoint after each (as a killed job leaves it)."""
    run_dir = tmp_path_factory.mktemp("four") / "run"
    run_training(1, *overrides(shards, run_dir, "train.max_steps=4", "train.keep_last=4"))
    (run_dir / "summary.json").unlink()
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{step:09d}"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_resume_auto_falls_back_to_the_newest_complete_checkpoint_with_one_warning(
        shards, four_steps, tmp_path, capsys):
    """A truncated file in checkpoint 4 and a write that never finished in 3: the run resumes
    from 2, says once which it skipped and why, and writes steps 3.. again, each once."""
    run_dir = copy_run(four_steps, tmp_path)
    model_file = checkpoint(run_dir, 4) / "pytorch_model.bin"
    os.truncate(model_file, model_file.stat().st_size // 2)
    (checkpoint(run_dir, 3) / "meta.json").unlink()
    code = train_main(["--config", str(DEMO), "--resume", "auto",
                       *overrides(shards, run_dir, "train.max_steps=6")])
    assert code == 0
    err = capsys.readouterr().err
    warnings_ = [line for line in err.splitlines() if "skipped" in line]
    assert len(warnings_) == 1, err
    assert "000000004 (pytorch_model.bin truncated" in warnings_[0]
    assert "000000003 (meta.json missing" in warnings_[0]
    assert "resuming from 000000002" in warnings_[0]
    assert f"resuming from {checkpoint(run_dir, 2)} (step 2" in err.replace("\n", "")
    steps = [e["step"] for e in events(run_dir) if e["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_folder_whose_checkpoints_are_all_unusable_is_a_one_line_error(
        shards, four_steps, tmp_path, capsys):
    run_dir = copy_run(four_steps, tmp_path)
    for step in range(1, 5):
        (checkpoint(run_dir, step) / "meta.json").unlink()
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    code = train_main(["--config", str(DEMO), "--resume", "auto", *overrides(shards, run_dir)])
    err = one_line_error(capsys)
    assert code == 2 and err.startswith("error: --resume auto: no usable checkpoint in")
    assert "000000004 (meta.json missing" in err and "000000001 (meta.json missing" in err
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # nothing lost


def test_a_fresh_run_never_overwrites_a_run_that_has_checkpoints(shards, four_steps, tmp_path,
                                                                 capsys):
    run_dir = copy_run(four_steps, tmp_path)
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    code = train_main(["--config", str(DEMO), *overrides(shards, run_dir)])
    err = one_line_error(capsys)
    assert code == 2 and err == (f"error: run folder {run_dir} already has checkpoints: continue "
                                 f"it with --resume auto, or set another run.dir")
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_a_fresh_run_keeps_the_metrics_of_a_job_killed_before_its_first_checkpoint(
        shards, four_steps, tmp_path, capsys):
    run_dir = copy_run(four_steps, tmp_path)
    import shutil

    shutil.rmtree(run_dir / "checkpoints")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    code = train_main(["--config", str(DEMO), "--resume", "auto",
                       *overrides(shards, run_dir, "train.max_steps=2")])
    assert code == 0
    assert (run_dir / "metrics.jsonl.1").read_bytes() == metrics
    assert [e["step"] for e in events(run_dir) if e["split"] == "train"] == [1, 2]
    assert "the earlier metrics.jsonl is kept as metrics.jsonl.1" in capsys.readouterr().err


def test_resume_path_with_another_run_dir_is_a_one_line_error(shards, four_steps, tmp_path,
                                                               capsys):
    code = train_main(["--config", str(DEMO), "--resume", str(four_steps),
                       *overrides(shards, tmp_path / "other")])
    err = one_line_error(capsys)
    assert code == 2 and err.startswith(f"error: --resume {four_steps} continues the run in "
                                        f"{four_steps}, but run.dir is {tmp_path / 'other'}")
    assert not (tmp_path / "other").exists()


def test_a_damaged_checkpoint_file_is_a_one_line_error(shards, four_steps, tmp_path, capsys):
    """Truncated (named by --resume PATH): refused before loading; same size but garbage: the
    load fails, and says so in one line."""
    run_dir = copy_run(four_steps, tmp_path)
    optimizer = checkpoint(run_dir, 4) / "optimizer.bin"
    os.truncate(optimizer, 100)
    code = train_main(["--config", str(DEMO), "--resume", str(checkpoint(run_dir, 4)),
                       *overrides(shards, run_dir)])
    err = one_line_error(capsys)
    assert code == 2 and "not a usable checkpoint (optimizer.bin truncated (100 of" in err
    model_file = checkpoint(run_dir, 3) / "pytorch_model.bin"
    model_file.write_bytes(b"\xff" * model_file.stat().st_size)
    code = train_main(["--config", str(DEMO), "--resume", str(checkpoint(run_dir, 3)),
                       *overrides(shards, run_dir)])
    err = one_line_error(capsys)
    assert code == 2 and err.startswith(f"error: checkpoint {checkpoint(run_dir, 3)} cannot be "
                                        f"loaded (")


def test_resume_auto_without_run_dir_continues_the_newest_run_that_has_checkpoints(
        shards, four_steps, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    old = Path(shutil.copytree(four_steps, tmp_path / "runs" / "exp" / "2026-01-01T00-00-00"))
    (tmp_path / "runs" / "exp" / "2026-01-02T00-00-00" / "checkpoints").mkdir(parents=True)
    args = [a for a in overrides(shards, old, "train.max_steps=5") if not a.startswith("run.dir")]
    code = train_main(["--config", str(DEMO), "--resume", "auto", "run.experiment=exp", *args])
    assert code == 0
    assert f"done: {Path('runs/exp/2026-01-01T00-00-00')}" in capsys.readouterr().out
    assert [e["step"] for e in events(old) if e["split"] == "train"] == [1, 2, 3, 4, 5]


def test_a_deepspeed_checkpoint_resumed_without_deepspeed_is_a_one_line_error(
        shards, four_steps, tmp_path, capsys):
    run_dir = copy_run(four_steps, tmp_path)
    meta = json.loads((checkpoint(run_dir, 4) / "meta.json").read_text())
    (checkpoint(run_dir, 4) / "meta.json").write_text(json.dumps({**meta, "deepspeed": True}))
    code = train_main(["--config", str(DEMO), "--resume", "auto", *overrides(shards, run_dir)])
    err = one_line_error(capsys)
    assert code == 2 and err == (f"error: checkpoint {checkpoint(run_dir, 4)} was written with "
                                 f"DeepSpeed on 1 process(es) and cannot be resumed without "
                                 f"DeepSpeed on 1; launch as the run was launched")


def test_usr1_during_start_up_is_held_until_the_trainer_can_checkpoint(shards, tmp_path):
    """SLURM's warning can come while torch is still importing: the process must neither die of
    it (SIGUSR1's default action) nor lose it. As under launch/slurm/ the process starts with
    SIGUSR1 ignored; launch/train.py blocks it at once, and the loop takes it when it is ready."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(1, *overrides(shards, run_dir, "train.max_steps=9")),
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    try:
        status = Path(f"/proc/{proc.pid}/status")
        deadline = time.monotonic() + 30
        while not int(next(line for line in status.read_text().splitlines()
                           if line.startswith("SigBlk:")).split()[1], 16) & (1 << 9):
            assert time.monotonic() < deadline, "SIGUSR1 never blocked"
            time.sleep(0.005)
        assert not run_dir.exists()  # still importing: nothing set up yet
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == f"stopped: {run_dir}"
    assert "checkpointing after this step" in err
    # it stopped before the first step: nothing trained, nothing to checkpoint, not finished
    assert latest_step(run_dir) == -1 and not (run_dir / "summary.json").exists()


# --- checkpoint writes -------------------------------------------------------------------------

def _fake_checkpoint(root: Path, step: int, value: float):
    path = ckpt.tmp_dir(root, step)
    path.mkdir(parents=True, exist_ok=True)
    (path / "x.txt").write_text(str(value))
    ckpt.write_meta(path, {"step": step})
    return path


def test_a_crash_between_the_renames_of_a_resave_keeps_a_usable_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 7, 1.0)
    ckpt.commit(root, 7, keep_last=2)
    _fake_checkpoint(root, 7, 2.0)  # the same step again (end of epoch after a periodic save)
    real_replace = os.replace

    def crash_on_the_second_rename(src, dst):
        if str(src).endswith(".tmp-000000007"):
            raise OSError(errno.EIO, "simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_second_rename)
    with pytest.raises(OSError):
        ckpt.commit(root, 7, keep_last=2)
    monkeypatch.undo()
    found = ckpt.latest(root)
    assert found is not None and found.name == ".old-000000007"
    assert (found / "x.txt").read_text() == "1.0"
    _fake_checkpoint(root, 8, 3.0)
    ckpt.commit(root, 8, keep_last=2)  # the next commit cleans up
    assert sorted(p.name for p in root.iterdir()) == ["000000008", "latest"]


def _fit(cfg_overrides, shards, run_dir):
    from mmvae.train.loop import fit

    return fit(load_config(DEMO, overrides(shards, run_dir, *cfg_overrides)))


def test_failed_checkpoint_writes_keep_the_previous_one(shards, tmp_path, monkeypatch, capsys):
    """Disk full from step 3 on, half-way through a write: the checkpoint of step 2 stays the
    newest usable one, no temporary folder is left, the failures are counted, training goes on."""
    real_write = ckpt.write_meta

    def disk_full_from_step_3(path, meta):
        if meta["step"] < 3:
            return real_write(path, meta)
        (path / "meta.json").write_text('{"step": ')  # half written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_meta", disk_full_from_step_3)
    run_dir, status = _fit(["train.max_steps=4"], shards, tmp_path / "run")
    assert status == "done"
    root = run_dir / "checkpoints"
    assert ckpt.latest(root) == root / "000000002"
    assert (root / "latest").read_text().strip() == "000000002"
    meta = ckpt.read_meta(root / "000000002")
    assert meta["step"] == 2 and {"pytorch_model.bin", "optimizer.bin"} <= set(meta["files"])
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    summary = json.loads((run_dir / "summary.json").read_text())
    # steps 3 and 4, and the end-of-run save, which tries step 4 again
    assert summary["step"] == 4 and summary["checkpoint_failures"] == 3
    err = capsys.readouterr().err
    assert "checkpoint at step 3 failed" in err and "No space left on device" in err


# --- non-finite steps --------------------------------------------------------------------------

def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(
        shards, tmp_path, monkeypatch, capsys):
    """NaN inputs at step 2 (alone) and from step 4 on: an isolated bad step is skipped and
    training goes on; max_bad_steps=3 in a row stop the run, and the last checkpoint holds the
    finite parameters of the last good update."""
    from mmvae.train import loop

    real_step = loop.train_step

    def nan_batches(ctx, batch):
        if ctx.step + 1 == 2 or ctx.step + 1 >= 4:
            batch = {**batch, "mnist": torch.full_like(batch["mnist"], float("nan"))}
        return real_step(ctx, batch)

    monkeypatch.setattr(loop, "train_step", nan_batches)
    with pytest.raises(loop.TrainingStopped, match="3 steps in a row") as stopped:
        _fit(["train.max_steps=20", "train.max_bad_steps=3", "train.keep_last=10"], shards,
             tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    assert "000000005" in str(stopped.value)  # names the checkpoint it kept
    by_step = {e["step"]: e for e in events(tmp_path / "run") if e["split"] == "train"}
    assert [by_step[s]["skipped"] for s in range(1, 7)] == [False, True, False, True, True, True]
    assert [by_step[s]["bad_steps"] for s in range(1, 7)] == [0, 1, 1, 2, 3, 4]
    assert ckpt.latest(root) == root / "000000005"  # no checkpoint of the stopping step
    good = ckpt.model_state(root / "000000003")
    for step in (4, 5):  # skipped updates leave the parameters as they were
        kept = ckpt.model_state(root / f"{step:09d}")
        for name, value in good.items():
            assert torch.equal(kept[name], value) and torch.isfinite(value).all(), name
    assert "update skipped (3 in a row of at most 3" in capsys.readouterr().err


def test_fp16_overflow_steps_are_counted_apart_and_the_scaler_is_checkpointed(
        shards, tmp_path, monkeypatch):
    """fp16 as accelerate sets it up on a GPU (a GradScaler; torch's CPU one here) and infinite
    gradients at steps 2 and 3: both are skipped as overflows, not bad steps (max_bad_steps=1
    would stop the run otherwise), the scale halves each time and is in the checkpoint, and a
    resumed run carries on from it."""
    from mmvae.train import loop

    real_accelerator, real_step = loop.make_accelerator, loop.train_step

    def fp16_accelerator(cfg, **kwargs):
        acc = real_accelerator(cfg, **kwargs)
        acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=1.0)
        return acc

    def overflow_at_2_and_3(run, batch):
        hooks = [p.register_hook(lambda g: g * float("inf")) for p in run.params[:1]
                 if run.step + 1 in (2, 3)]
        try:
            return real_step(run, batch)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(loop, "make_accelerator", fp16_accelerator)
    monkeypatch.setattr(loop, "train_step", overflow_at_2_and_3)
    args = ["train.max_steps=4", "train.max_bad_steps=1", "train.mixed_precision=fp16",
            "train.keep_last=4"]
    run_dir, status = _fit(args, shards, tmp_path / "run")
    assert status == "done"
    train = [e for e in events(run_dir) if e["split"] == "train"]
    assert [e["skipped"] for e in train] == [False, True, True, False]
    assert [e["overflow_steps"] for e in train] == [0, 1, 2, 2]
    assert [e["bad_steps"] for e in train] == [0, 0, 0, 0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["overflow_steps"] == 2 and summary["bad_steps"] == 0
    root = run_dir / "checkpoints"
    scales = [torch.load(root / f"{s:09d}" / "scaler.pt", weights_only=True)["scale"]
              for s in (1, 2, 3, 4)]
    assert scales == [1.0, 0.5, 0.25, 0.25]
    (run_dir / "summary.json").unlink()
    from mmvae.train.loop import fit

    fit(load_config(DEMO, overrides(shards, run_dir, *args[1:], "train.max_steps=5")),
        resume="auto")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 5 and summary["overflow_steps"] == 2


def test_training_stopped_exits_1_with_the_reason(shards, tmp_path, monkeypatch, capsys):
    from mmvae.train import loop

    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda ctx, batch: real_step(
        ctx, {**batch, "svhn": torch.full_like(batch["svhn"], float("inf"))}))
    code = train_main(["--config", str(DEMO),
                 *overrides(shards, tmp_path / "run", "train.max_bad_steps=2")])
    assert code == 1
    assert "stopped: 2 steps in a row had a non-finite loss" in capsys.readouterr().err


# --- run folder --------------------------------------------------------------------------------

def test_unwritable_run_folder_is_a_one_line_error_at_start(shards, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = train_main(["--config", str(DEMO), *overrides(shards, blocker / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err == (f"error: run folder {blocker / 'run'} cannot be written: {blocker} is not a "
                   f"folder; set run.dir to a writable folder")


def test_too_little_disk_space_is_a_one_line_error_at_start(shards, tmp_path, monkeypatch,
                                                            capsys):
    import shutil

    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: real_usage(path)._replace(free=1 << 20))  # 1 MiB free
    code = train_main(["--config", str(DEMO), *overrides(shards, tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "1.0 MiB free, checkpoints need about" in err and "train.keep_last=2" in err
    assert not (tmp_path / "run").exists()  # nothing written


# --- W&B ---------------------------------------------------------------------------------------

@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home"))


def test_wandb_online_without_credentials_logs_offline_with_one_warning(
        shards, tmp_path, no_wandb_credentials):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir, status = _fit(["train.max_steps=2", "logging.wandb=online"], shards,
                               tmp_path / "run")
    ours = [w for w in caught if "W&B" in str(w.message)]
    assert status == "done"
    assert [str(w.message) for w in ours] == [
        "logging.wandb=online but no W&B credentials: logging offline (upload later with "
        "`wandb sync`)"]
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_training_goes_on_when_wandb_logging_raises(shards, tmp_path, no_wandb_credentials,
                                                    monkeypatch):
    from accelerate.tracking import WandBTracker

    calls = []

    def broken_log(self, values, step=None, **kwargs):
        calls.append(step)
        raise ConnectionError("wandb service gone")

    monkeypatch.setattr(WandBTracker, "log", broken_log)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir, status = _fit(["train.max_steps=3", "logging.wandb=offline"], shards,
                               tmp_path / "run")
    assert status == "done" and calls == [1]  # one failure, then W&B logging is off
    ours = [str(w.message) for w in caught if "W&B logging failed" in str(w.message)]
    assert ours == ["W&B logging failed (ConnectionError: wandb service gone); continuing "
                    "without it (metrics.jsonl has every event)"]
    assert [e["step"] for e in events(run_dir) if e["split"] == "train"] == [1, 2, 3]
