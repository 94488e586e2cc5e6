"""Launchers on bad input: one line naming the problem and the fix, exit 2, nothing written."""
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def launcher(name: str):
    """mmvae.cli.<name>.main, what launch/<name>.py runs."""
    return importlib.import_module(f"mmvae.cli.{name}").main


def bench_main():
    """main of benchmarks/bench.py (a script, not a command of the package)."""
    spec = importlib.util.spec_from_file_location("bench_entry", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run(name: str, argv) -> int:
    try:
        return (bench_main() if name == "bench" else launcher(name))(argv)
    except SystemExit as exit_:  # argparse
        return exit_.code


@pytest.mark.parametrize("name,extra", [
    ("shard_demo", ["--dataset", "digits"]),
    ("shard_mnist_svhn", ["--mnist", "m", "--svhn", "s"]),
    ("shard_cub", ["--cub", "c"]),
    ("shard_polymnist", ["--polymnist", "p"]),
])
@pytest.mark.parametrize("out,why", [
    ("{tmp}/afile", "afile is not a folder"),             # --out an existing file
    ("{tmp}/afile/shards", "afile is not a folder"),
    ("/proc/nope/shards", "/proc does not allow new files"),  # unwritable, even for root
])
def test_shard_scripts_refuse_an_out_folder_they_cannot_write(tmp_path, capsys, name, extra,
                                                              out, why):
    (tmp_path / "afile").write_text("keep me")
    out = out.format(tmp=tmp_path)
    assert run(name, [*extra, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out} cannot be written") \
        and why in err[0], err
    assert (tmp_path / "afile").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_bench_reports_a_bad_override_in_one_line(capsys):
    assert run("bench", ["objective.K=nan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: objective.K: expected int, got 'nan'"]


def test_ctrl_c_during_training_is_one_line_and_keeps_the_checkpoints(shards, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "launch/train.py", "--config", "configs/demo.yaml",
         f"data.shards={shards}", "data.builtin=", f"run.dir={run_dir}", "logging.wandb=disabled",
         "logging.progress=false", "data.batch_size=4", "model.latent_dim=4", "objective.K=2",
         "train.epochs=1000", "train.checkpoint_every=1", "train.log_every=1",
         "train.test_every=0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C's default action even where this test runs with SIGINT ignored (a suite started
        # in the background by a non-interactive shell): the child would inherit SIG_IGN,
        # Python would then install no KeyboardInterrupt handler, and the signal would do nothing
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "latest").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted: the last checkpoint is kept")
    assert (run_dir / "checkpoints" / "latest").is_file()
