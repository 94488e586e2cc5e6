"""Console and progress: whole lines when piped, a line with count and eta per phase."""
import subprocess
import sys
from pathlib import Path

from mmvae import log

ROOT = Path(__file__).resolve().parent.parent


def test_piped_console_keeps_long_lines_whole():
    text = "run " + "/very/long/run/folder" * 8 + " (1 in all)"
    proc = subprocess.run([sys.executable, "-c", f"from mmvae.log import console; "
                                                 f"console.print({text!r})"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [text]  # rich wrapped this at 80 columns


def test_track_when_piped_prints_what_it_does_with_count_and_eta(capsys, monkeypatch):
    monkeypatch.setattr(log, "LINE_EVERY_S", 0.0)
    assert list(log.track(iter(range(4)), "test bound (K=2)", total=4)) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "test bound (K=2): 0/4"
    assert lines[1].startswith("test bound (K=2): 1/4, 0:00:00 elapsed, eta ")
    assert lines[-1] == "test bound (K=2): 4/4 in 0:00:00" and len(lines) == 1 + 3 + 1


def test_track_is_silent_when_disabled_and_no_bar_is_live(capsys):
    assert list(log.track(range(3), "classifier training", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_info_prints_on_the_main_process_only(capsys, monkeypatch):
    """Before the process group is up a launcher's RANK says which process is main; a message
    shown once per run must not repeat on every rank."""
    monkeypatch.setenv("RANK", "1")
    log.info("resuming from somewhere")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    log.info("resuming from somewhere")
    assert capsys.readouterr().err == "resuming from somewhere\n"


def test_training_shows_the_end_of_run_test_bound(shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "configs/demo.yaml",
         f"data.shards={shards}", "data.builtin=", f"run.dir={run_dir}", "logging.wandb=disabled", "data.batch_size=4",
         "model.latent_dim=4", "objective.K=2", "train.max_steps=2", "train.test_batches=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test bound (K=2, 2 batches): 2/2 in " in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"done: {run_dir}"
