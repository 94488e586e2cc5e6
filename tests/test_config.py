"""Config: YAML + dotted overrides, validation with one-line errors, exit code 2, nothing written."""
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
])
def test_bad_values_raise_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


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
    (["--config", "configs/mnist_svhn.yaml", "data.shards={tmp}/none"],
     "shard_mnist_svhn.py"),
])
def test_train_entry_point_exits_2_and_writes_nothing(tmp_path, args, match):
    run_dir = tmp_path / "run"
    args = [a.format(tmp=tmp_path) for a in args] + [f"run.dir={run_dir}", "logging.wandb=disabled"]
    proc = subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and __import__("re").search(match, last), last
    assert not run_dir.exists()
