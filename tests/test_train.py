"""The trainer end to end on tiny built-in digits shards: one process and two CPU processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmvae
from mmvae.config import load_config
from mmvae.data.recipes.digits import build_digits

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    build_digits(out, pairs_per_instance=2, sources_per_class=12, train_shards=4,
                 test_shards=2, progress=False)
    return out


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    return env


def _overrides(shards, run_dir, *extra):
    return [f"data.shards={shards}", f"run.dir={run_dir}", "logging.wandb=disabled",
            "logging.progress=false", "data.batch_size=16", "model.latent_dim=8",
            "objective.K=2", "train.test_batches=1", *extra]


def test_short_training_lowers_the_loss_and_writes_the_run_folder(tiny_digits, tmp_path):
    from mmvae.train.loop import fit

    run_dir = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      _overrides(tiny_digits, run_dir, "train.epochs=6", "train.lr=3e-3"))
    out_dir, status = fit(cfg)
    assert status == "done" and out_dir == run_dir
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tests = [e["bound"] for e in events if e["split"] == "test"]
    assert len(tests) == 6 and tests[-1] > tests[0] + 100  # the test bound improves (nats)
    assert {e["split"] for e in events} == {"train", "test"}
    for name in ("config.yaml", "summary.json", "model/model.json", "checkpoints/latest"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "images").glob("recon_*.png"))
    model = mmvae.load_model(run_dir / "model")
    assert model.modalities == ["mnist", "svhn"] and model.latent_dim == 8
    saved = torch.load(run_dir / "model" / "weights.pt", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key])


def test_periodic_evaluation_matches_evaluate_and_leaves_training_unchanged(tiny_digits, tmp_path):
    """train.eval_every=1: coherence (and the subset coherence) after every epoch equals
    launch/evaluate.py on the final model, bit for bit, and the training itself (every train and test event) is that of a run
    without it; attributes (captions) does not apply to mnist_svhn and is skipped."""
    from mmvae.eval.run import evaluate_run
    from mmvae.train.loop import fit

    options = ["train.eval_every=1", "train.eval_metrics=coherence,subset_coherence,attributes",
               "eval.classifier_epochs=1",
               "eval.coherence_samples=40", "eval.max_datapoints=48", "eval.batch_size=16"]
    events = {}
    for name, extra in (("plain", []), ("eval", options)):
        fit(load_config(ROOT / "configs" / "demo.yaml",
                        _overrides(tiny_digits, tmp_path / name, "train.epochs=2", *extra)))
        events[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    def training(evs):
        return [{k: v for k, v in e.items() if k != "samples_per_s"} for e in evs if e["split"] != "eval"]

    assert training(events["plain"]) == training(events["eval"])
    evals = [e for e in events["eval"] if e["split"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2]
    final = {k[len("coherence/"):]: v for k, v in evals[-1].items() if k.startswith("coherence/")}
    assert {"cross_mnist_to_svhn", "cross_svhn_to_mnist", "joint"} <= set(final)
    assert not any(k.startswith("attributes/") for k in evals[-1])
    again = evaluate_run(tmp_path / "eval", ["coherence", "subset_coherence"], progress=False)
    assert again["metrics"]["coherence"]["values"] == final
    subsets = {k[len("subset_coherence/"):]: v for k, v in evals[-1].items()
               if k.startswith("subset_coherence/")}
    assert again["metrics"]["subset_coherence"]["values"] == subsets  # also logged to W&B
    assert subsets["cond_svhn_to_mnist"] == final["cross_svhn_to_mnist"]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["eval"] == evals[-1]
    with pytest.raises(Exception, match="train.eval_metrics has pictures; choose from"):
        load_config(None, ["train.eval_metrics=pictures"])


def test_two_cpu_processes_train_through_accelerate_launch(tiny_digits, tmp_path):
    run_dir = tmp_path / "run2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", "launch/train.py", "--config", "configs/demo.yaml",
           *_overrides(tiny_digits, run_dir, "train.max_steps=3", "parallel.particle_shards=2",
                       "train.eval_every=1", "eval.classifier_epochs=1", "eval.coherence_samples=40",
                       "eval.max_datapoints=48", "eval.batch_size=16")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"done: {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 3
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(e["step"] <= 3 for e in train)  # one metrics writer, not one per rank
    evals = [e for e in train if e["split"] == "eval"]  # at the end; both ranks computed shares
    assert len(evals) == 1 and 0.0 <= evals[0]["coherence/joint"] <= 1.0


def test_bf16_training_stays_finite_and_close_to_fp32(tiny_digits, tmp_path):
    from mmvae import objectives
    from mmvae.data import make_loader

    torch.manual_seed(0)
    model = mmvae.build_model("mnist_svhn", latent_dim=8)
    batch = next(iter(make_loader(tiny_digits, "test", batch_size=16, modalities=model.modalities,
                                  shuffle=False)))
    xs = [batch["mnist"], batch["svhn"]]
    eps = model.sample_noise(4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = objectives.m_iwae(model, xs, eps=eps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = objectives.m_iwae(model, xs, eps=eps)
    assert bf16.dtype == torch.float64  # density sums, log-weights, log-sum-exp: fp64
    assert torch.isfinite(bf16).all()
    assert ((bf16 - fp32).abs() / fp32.abs()).max() < 0.01
    run_dir = tmp_path / "bf16"
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      _overrides(tiny_digits, run_dir, "train.max_steps=8",
                                 "train.mixed_precision=bf16"))
    from mmvae.train.loop import fit

    fit(cfg)
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(e["bound"], float) and e["bound"] == e["bound"] for e in events)
    assert json.loads((run_dir / "summary.json").read_text())["bad_steps"] == 0


def _fp16_accelerator(cfg):
    """make_accelerator's Accelerator with fp16 set up as accelerate does on a GPU (native AMP and
    a GradScaler), the scaler being torch's CPU one (accelerate refuses fp16 on a CPU itself)."""
    from mmvae.train.dist import make_accelerator

    acc = make_accelerator(cfg)
    acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    return acc


def test_an_fp16_overflow_skips_the_update_lowers_the_scale_and_training_goes_on():
    """Through the real train_step: an infinite gradient at step 2 is an overflow -- the update is
    skipped (parameters and Adam untouched), the scaler halves its scale -- and step 3 updates
    again (before the fix it raised `unscale_() has already been called`)."""
    from types import SimpleNamespace

    from mmvae.train.dist import make_layout, release
    from mmvae.train.optim import make_optimizer
    from mmvae.train.step import ObjectiveModule, estimator_for, train_step

    cfg = load_config(None, ["model.name=gaussian_pair", "model.latent_dim=2", "model.data_dim=3",
                             "objective.name=dreg", "objective.K=4", "train.mixed_precision=fp16",
                             "logging.wandb=disabled"])
    acc = _fp16_accelerator(cfg)
    try:
        torch.manual_seed(0)
        model = mmvae.build_model("gaussian_pair", latent_dim=2, data_dim=3)
        wrapped, optimizer = acc.prepare(ObjectiveModule(model, estimator_for(cfg, True)),
                                         make_optimizer(model, 1e-2))
        run = SimpleNamespace(cfg=cfg, model=model, accelerator=acc, layout=make_layout(acc, cfg),
                              wrapped=wrapped, optimizer=optimizer, looser=False, step=0,
                              params=[p for p in model.parameters() if p.requires_grad])
        g = torch.Generator().manual_seed(1)
        batch = {"x1": torch.randn(8, 3, generator=g), "x2": torch.randn(8, 3, generator=g)}
        target = run.params[0]
        stats, scales, before = [], [], None
        for run.step in range(3):
            hook = (target.register_hook(lambda grad: grad * float("inf")) if run.step == 1
                    else None)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            stats.append(train_step(run, batch))
            scales.append(acc.scaler.get_scale())
            if hook is not None:
                hook.remove()
                for k, v in model.state_dict().items():
                    assert torch.equal(v, before[k]), f"{k} moved in the skipped step"
        assert [(s["skipped"], s["overflow"]) for s in stats] == [(False, False), (True, True),
                                                                  (False, False)]
        assert scales[1] == scales[0] / 2 and scales[2] == scales[1]
        assert all(abs(s["bound"]) < float("inf") for s in stats)
        moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert moved, "step 3 did not update"
    finally:
        release(acc)
