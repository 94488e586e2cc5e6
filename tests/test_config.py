"""Config: YAML + dotted overrides, validation with one-line errors, exit code 2, nothing written."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmvae.config import ConfigError, from_dict, load_config, save_config, to_dict, valid_keys

ROOT = Path(__file__).resolve().parent.parent


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective:\n  K: 12\n  name: iwae\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["objective.K=50", "train.mixed_precision=bf16", "eval.metrics=a,b",
                             "train.grad_clip=1e1"])
    assert (cfg.objective.K, cfg.objective.name, cfg.train.lr) == (50, "iwae", 0.01)
    assert cfg.train.mixed_precision == "bf16" and cfg.eval.metrics == ["a", "b"]
    assert cfg.train.grad_clip == 10.0


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "mnist_svhn.yaml", ["objective.K=20"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg) == to_dict(from_dict(to_dict(cfg)))


@pytest.mark.parametrize("overrides,match", [
    (["objective.kk=3"], "unknown config key 'objective.kk'; valid keys: .*objective.K"),
    (["nosection.x=1"], "unknown config key"),
    (["objective.K=abc"], "objective.K: expected int"),
    (["objective.K=0"], "objective.K must be > 0"),
    (["objective.name=vi"], "choose one of elbo, iwae, dreg"),
    (["objective.K=30", "parallel.particle_shards=4"], "not divisible"),
    (["train.mixed_precision=fp8"], "no, bf16, fp16"),
    (["objective.K"], "key=value"),
    (["train.lr=nan"], "train.lr: expected a finite number"),
    (["model.llik_scaling=nan"], "model.llik_scaling: expected a finite number"),
    (["train.grad_clip=nan"], "train.grad_clip: expected a finite number"),
    (["train.lr=.inf"], "train.lr: expected a finite number"),
    (["train.grad_clip=-.inf"], "train.grad_clip: expected a finite number"),
    (["train.lr=1e999"], "train.lr: expected a finite number"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["model.llik_scaling=-1"], "model.llik_scaling must be >= 0"),
    (["logging.wandb=off"], "logging.wandb='off'; choose one of offline, online, disabled"),
    (["objective.dreg_variant=loo"], "choose one of unbiased, paper, stl, cv, swap"),
    (["objective.dreg_variant=swap", "objective.looser=false"],
     "swap needs the looser bound: .*use objective.dreg_variant=cv for the joint bound"),
    (["objective.dreg_variant=swap", "train.mixed_precision=fp16"],
     "swap loses terms under fp16 gradients: set train.mixed_precision=bf16"),
])
def test_bad_values_raise_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_yaml_yes_no_on_off_are_strings_for_string_keys_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\nmodel:\n  learn_prior: yes\n"
                    "objective:\n  looser: off\ndata:\n  builtin: on\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.data.builtin == "on"
    assert cfg.model.learn_prior is True and cfg.objective.looser is False  # booleans still read
    cfg = load_config(None, ["train.mixed_precision=no", "run.experiment=off",
                             "model.learn_prior=on", "objective.looser=No"])
    assert (cfg.train.mixed_precision, cfg.run.experiment) == ("no", "off")
    assert cfg.model.learn_prior is True and cfg.objective.looser is False
    again = tmp_path / "saved.yaml"  # the saved config reads back the same
    save_config(cfg, again)
    assert to_dict(load_config(again)) == to_dict(cfg)


def test_non_finite_floats_in_a_yaml_file_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_config(path)


def test_empty_section_keeps_the_defaults_and_a_scalar_section_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\nobjective:\n  K: 3\n")
    cfg = load_config(path)
    assert cfg.model.name == "mnist_svhn" and cfg.objective.K == 3
    path.write_text("model: mnist\n")
    with pytest.raises(ConfigError, match="section 'model' holds 'mnist', not keys") as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_non_utf8_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  experiment: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text .*save the config as UTF-8"):
        load_config(path)


def test_every_documented_contract_key_exists():
    keys = set(valid_keys())
    for key in ("model.name", "model.latent_dim", "model.learn_prior", "model.llik_scaling",
                "objective.name", "objective.looser", "objective.K", "objective.k_chunk",
                "objective.dreg_variant", "data.shards", "data.batch_size", "data.num_workers",
                "train.epochs", "train.max_steps", "train.seed", "train.lr",
                "train.mixed_precision", "parallel.particle_shards", "logging.wandb", "run.dir"):
        assert key in keys


@pytest.mark.parametrize("args,match", [
    (["--config", "configs/demo.yaml", "objective.KK=1"], "unknown config key"),
    (["--config", "configs/nope.yaml"], "not found"),
    (["--config", "configs/demo.yaml", "model.name=nope"], "valid: .*mnist_svhn"),
    # under the config's `auto`: the precision line comes only after a good start
    (["--config", "configs/mnist_svhn.yaml", "data.shards={tmp}/none"], "shard_mnist_svhn.py"),
    # the README's own advice (YAML 1.1 read `no` as False)
    (["--config", "configs/demo.yaml", "train.mixed_precision=no", "train.lr=nan"],
     "train.lr: expected a finite number"),
    # UnicodeDecodeError, then an UnboundLocalError of the `except` that named TrainingStopped
    (["--config", "{tmp}/latin1.yaml"], "not UTF-8"),
    # not writable although root passes os.access there; used to say "0.0 MiB free"
    (["--config", "configs/demo.yaml", "run.dir=/proc/nope/run"],
     "run folder /proc/nope/run cannot be written: /proc does not allow new files"),
    (["--config", "configs/demo.yaml", "run.dir={tmp}/afile/run"], "afile is not a folder"),
    # the built-in dataset cannot be built where data.shards points: no PermissionError traceback
    (["--config", "configs/demo.yaml", "data.shards=/proc/nope/shards"],
     "data.builtin=digits cannot be built into data.shards=/proc/nope/shards: /proc does not"),
    (["--config", "configs/demo.yaml", "data.shards={tmp}/afile/shards"],
     "data.builtin=digits cannot be built .*afile is not a folder"),
    (["--config", "configs/demo.yaml", "--no-such-option"], "unrecognized arguments"),
])
def test_train_entry_point_exits_2_and_writes_nothing(tmp_path, args, match, capfd, monkeypatch):
    """In this process through `mmvae.cli.train.main` (each case costs no interpreter start);
    the cases that go through the real entry point follow below."""
    from mmvae.cli.train import main

    run_dir, args = _bad_start(tmp_path, args)
    monkeypatch.chdir(ROOT)
    try:
        code = main([*args, "logging.wandb=disabled"])
    except SystemExit as exit:  # argparse's own errors (OneLineParser: one line, status 2)
        code = exit.code
    assert code == 2
    _assert_one_error_line(capfd.readouterr().err, match)
    assert not run_dir.exists() and not (tmp_path / "shards").exists()


@pytest.mark.parametrize("args,match", [
    (["--config", "configs/demo.yaml", "objective.KK=1"], "unknown config key"),  # before torch
    (["--config", "configs/demo.yaml", "run.dir=/proc/nope/run"],  # after the Accelerator
     "run folder /proc/nope/run cannot be written: /proc does not allow new files"),
    (["--config", "configs/demo.yaml", "--no-such-option"], "unrecognized arguments"),
])
def test_launch_train_exits_2_with_one_line_and_writes_nothing(tmp_path, args, match):
    """The real entry point, `python launch/train.py`: nothing printed at import (library
    warnings included) comes before or after the one line."""
    run_dir, args = _bad_start(tmp_path, args)
    proc = subprocess.run([sys.executable, "launch/train.py", *args, "logging.wandb=disabled"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    _assert_one_error_line(proc.stderr, match)
    assert not run_dir.exists() and not (tmp_path / "shards").exists()


def _bad_start(tmp_path, args):
    run_dir = tmp_path / "run"
    (tmp_path / "latin1.yaml").write_bytes("run:\n  experiment: café\n".encode("latin-1"))
    (tmp_path / "afile").write_text("not a folder")
    args = [a.format(tmp=tmp_path) for a in args]
    if not any(a.startswith("run.dir=") for a in args):
        args.append(f"run.dir={run_dir}")
    return run_dir, args


def _assert_one_error_line(stderr: str, match: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert re.match(r"(train.py: )?error: ", lines[0]) and re.search(match, lines[0]), lines[0]
