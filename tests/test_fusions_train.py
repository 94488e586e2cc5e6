"""Every fusion trains through launch/train.py (configs/demo.yaml on tiny digits shards): the
ELBO on one process, and DReG with its K particles split over two processes (P=2), which equals
one process drawing all of them (moe's DReG: tests/test_resume.py and test_distributed.py).
The ELBO through the trainer was broken for every model before (the trainer passes `reducer`)."""
import json

import pytest
import torch

from test_resume import events, run_training, train_main, weights


def overrides(shards, run_dir, fusion, *extra):
    return [f"data.shards={shards}", "data.builtin=", f"run.dir={run_dir}",
            "logging.wandb=disabled", "logging.progress=false", "data.batch_size=4",
            "model.latent_dim=4", f"model.fusion={fusion}", "train.test_batches=1",
            "train.log_every=1", "train.max_steps=3", "train.epochs=1", *extra]


@pytest.mark.parametrize("fusion", ["moe", "mopoe", "poe", "moe_plus"])
def test_every_fusion_trains_with_its_elbo_on_one_process(shards, tmp_path, fusion):
    run_dir = tmp_path / "run"
    from test_resume import DEMO

    assert train_main(["--config", str(DEMO), *overrides(shards, run_dir, fusion,
                                                         "objective.name=elbo")]) == 0
    train = [e for e in events(run_dir) if e["split"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(e["bound"])) for e in train)
    saved = json.loads((run_dir / "model" / "model.json").read_text())
    assert saved["fusion"] == fusion  # the model is rebuilt with its fusion by load_model


@pytest.mark.parametrize("fusion", ["mopoe", "poe", "moe_plus"])
def test_two_particle_shards_through_launch_train_equal_one_process(shards, tmp_path, fusion):
    """Three DReG steps (joint bound, K=2): the same bounds and gradient norms at every step and
    the same weights, whether one process draws both particles of each component or two
    processes draw one each."""
    assert_p2_equals_one_process(shards, tmp_path, fusion, "objective.name=dreg",
                                 "objective.looser=false", "objective.K=2")


def assert_p2_equals_one_process(shards, tmp_path, fusion, *common, weights_atol=1e-5):
    """Train once on one process and once with the particles split over two (P=2): the same
    events, bounds and gradient norms (rel 1e-5) at every step, and the same final weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_training(1, *overrides(shards, one, fusion, *common))
    run_training(2, *overrides(shards, two, fusion, *common, "parallel.particle_shards=2"))
    got, want = events(two), events(one)
    assert [(e["step"], e["split"]) for e in got] == [(e["step"], e["split"]) for e in want]
    for g, w in zip(got, want):
        for key in ("bound", "grad_norm"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5), (key, g, w)
    want_w, got_w = weights(one), weights(two)
    for name, value in want_w.items():
        torch.testing.assert_close(got_w[name], value, rtol=1e-4, atol=weights_atol, msg=name)
