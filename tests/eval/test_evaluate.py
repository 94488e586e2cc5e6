"""evaluate_run and launch/evaluate.py end to end: toy run, digits run, bad input, report."""
import importlib
import json

import pytest
import torch

import mmvae
from mmvae.config import load_config, save_config
from mmvae.eval.metrics import METRICS
from mmvae.eval.report import render_report
from mmvae.eval.run import evaluate_run


def make_run(run_dir, model, overrides):
    run_dir.mkdir(parents=True)
    save_config(load_config(None, overrides), run_dir / "config.yaml")
    mmvae.save_model(model, run_dir / "model")
    return run_dir


@pytest.fixture
def toy_run(tmp_path, gaussian_pair):
    return make_run(tmp_path / "toy", gaussian_pair,
                    ["model.name=gaussian_pair", "model.latent_dim=2", "model.data_dim=3",
                     "logging.progress=false", "train.seed=7"])


def evaluate_main():
    return importlib.import_module("mmvae.cli.evaluate").main


def test_toy_run_end_to_end(toy_run):
    out = evaluate_run(toy_run, ["likelihood", "pictures"], ["eval.iwae_K=200"],
                       embedding="pca", toy_datapoints=100, plot_batch=50)
    saved = json.loads((toy_run / "eval.json").read_text())
    assert saved["metrics"] == out["metrics"] and saved["seed"] == 7
    lik = saved["metrics"]["likelihood"]
    assert lik["K"] == 200 and lik["num_datapoints"] == 100
    model = mmvae.load_model(toy_run / "model")
    xs = model.sample_data(100, torch.Generator().manual_seed(8))  # the toy test split
    exact = model.exact_log_likelihood(xs).mean().item()
    assert lik["values"]["joint_no_lambda"] == pytest.approx(exact, abs=0.1)
    files = saved["metrics"]["pictures"]["files"]
    assert files == ["eval/embedding.png", "eval/kl_per_dimension.png"]  # no image modality
    assert all((toy_run / f).stat().st_size > 0 for f in files)
    report = (toy_run / "report.md").read_text()
    assert "| metric | value | paper (MMVAE) |" in report
    assert "| likelihood / joint_no_lambda |" in report
    assert "![embedding](eval/embedding.png)" in report
    again = evaluate_run(toy_run, ["likelihood"], ["eval.iwae_K=200"], toy_datapoints=100)
    assert again["metrics"]["likelihood"] == lik  # seeded


def test_bad_input_raises_before_writing(toy_run, tmp_path):
    with pytest.raises(ValueError, match=", ".join(METRICS)):
        evaluate_run(toy_run, ["likelihood", "fid"])
    with pytest.raises(ValueError, match="labelled"):
        evaluate_run(toy_run, ["coherence"])
    with pytest.raises(ValueError, match="unknown config key"):
        evaluate_run(toy_run, ["likelihood"], ["eval.nope=1"])
    with pytest.raises(ValueError, match="unknown config key .eval.nope"):
        evaluate_run(toy_run, ["likelihood"], nope=1)
    with pytest.raises(FileNotFoundError):
        evaluate_run(tmp_path / "missing")
    assert not (toy_run / "eval.json").exists() and not (toy_run / "report.md").exists()


def run_cli(argv) -> int:
    try:
        return evaluate_main()(argv)
    except SystemExit as exit_:  # argparse errors
        return exit_.code


def test_cli(toy_run, tmp_path, capsys):
    assert run_cli(["--run", str(toy_run), "--metrics", "likelihood", "eval.iwae_K=10"]) == 0
    out = capsys.readouterr().out
    assert "joint_no_lambda" in out and "report.md" in out
    for argv in (["--run", str(tmp_path / "missing")],
                 ["--run", str(toy_run), "--metrics", "fid"],
                 ["--run", str(toy_run), "eval.iwae_K=zero"],
                 []):
        assert run_cli(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err


def test_cli_says_in_one_line_each_which_default_metrics_do_not_apply(toy_run, capsys):
    """The config's default list on a reference model: the metrics that need labels are
    skipped, each with one `note:` line (not a warning's file:line and source line)."""
    assert run_cli(["--run", str(toy_run), "--metrics", "", "eval.iwae_K=10",
                    "eval.metrics=[likelihood,coherence,latent]"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: skipping coherence needs labelled data; model gaussian_pair has none",
                   "note: skipping latent needs labelled data; model gaussian_pair has none"], err


def test_cli_truncated_weights_are_one_line_exit_2(toy_run, capsys):
    weights = toy_run / "model" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert run_cli(["--run", str(toy_run), "--metrics", "likelihood"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated or damaged" in err[0] and "model" in err[0], err
    assert not (toy_run / "eval.json").exists() and not (toy_run / "eval").exists()


def test_cli_refuses_model_overrides_instead_of_ignoring_them(toy_run, capsys):
    assert run_cli(["--run", str(toy_run), "--metrics", "likelihood", "model.latent_dim=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.latent_dim=5" in err[0] and "cannot change" in err[0], err
    assert not (toy_run / "eval.json").exists()
    # an override equal to the trained model's value changes nothing and is accepted
    assert run_cli(["--run", str(toy_run), "--metrics", "likelihood", "eval.iwae_K=5",
                    "eval.toy_datapoints=10", "model.latent_dim=2"]) == 0


def test_report_shows_paper_numbers_only_for_mnist_svhn():
    payload = {"run_dir": "runs/x", "model": "mnist_svhn", "modalities": ["mnist", "svhn"],
               "dataset": "mnist_svhn", "seed": 1, "device": "cpu", "seconds": 1.0,
               "metrics": {"coherence": {"values": {"cross_svhn_to_mnist": 0.8,
                                                    "cross_mnist_to_svhn": 0.6, "joint": 0.4}}}}
    text = render_report(payload)
    assert "| coherence / cross_svhn_to_mnist | 80.0% | 86.4% |" in text
    assert "| coherence / cross_mnist_to_svhn | 60.0% | 69.1% |" in text
    assert "| coherence / joint | 40.0% | 42.1% |" in text
    text = render_report({**payload, "dataset": "digits"})
    assert "| coherence / joint | 40.0% |  |" in text


def test_digits_run_end_to_end(tmp_path):
    """Real shards (built-in digits), an untrained mnist_svhn: every metric runs."""
    from mmvae.data import build_digits

    shards = tmp_path / "digits"
    build_digits(shards, pairs_per_instance=1, train_shards=2, test_shards=1, progress=False)
    torch.manual_seed(0)
    run = make_run(tmp_path / "run", mmvae.build_model("mnist_svhn", latent_dim=4),
                   ["model.name=mnist_svhn", "model.latent_dim=4", f"data.shards={shards}",
                    "logging.progress=false"])
    out = evaluate_run(run, ["likelihood", "coherence", "latent", "pictures"],
                       ["eval.iwae_K=4", "eval.k_chunk=2"], classifier_epochs=1,
                       max_datapoints=64, coherence_samples=100, embedding="pca", plot_batch=32)
    m = out["metrics"]
    assert m["likelihood"]["num_datapoints"] == 64
    assert m["coherence"]["test_pairs"].startswith("unique")
    assert m["coherence"]["num_pairs"] == 64
    assert 0.0 <= m["coherence"]["values"]["cross_svhn_to_mnist"] <= 0.3  # untrained: chance
    assert (shards / "classifiers" / "svhn.pt").is_file()
    from mmvae.eval.run import prepare  # the default list: no subset metric repeats the pair's
    assert prepare(run)[1] == ["likelihood", "coherence", "latent", "pictures"]
    assert set(m["latent"]["values"]) == {"latent_mnist", "latent_svhn"}
    assert len(m["pictures"]["files"]) == 6  # recon png+txt, 2 prior grids, embedding, KL
    assert all((run / f).stat().st_size > 0 for f in m["pictures"]["files"])
    report = (run / "report.md").read_text()
    assert "![reconstructions](eval/reconstructions.png)" in report
    shards_pairs = evaluate_run(run, ["coherence"], classifier_epochs=1, coherence_pairs="shards",
                                max_datapoints=50, coherence_samples=10)
    assert shards_pairs["metrics"]["coherence"]["test_pairs"].startswith("duplicated")


def test_shapes_run_attributes_end_to_end(make_shapes_run, toy_run):
    """Real shapes_simple shards, an untrained cubIS: attribute coherence and caption pictures."""
    run, shards = make_shapes_run(test_scenes=12)
    out = evaluate_run(run, ["attributes", "pictures"], classifier_epochs=1, coherence_samples=20,
                       embedding="pca", plot_batch=8, batch_size=5)
    m = out["metrics"]["attributes"]
    assert m["num_scenes"] == 12 and m["joint_samples"] == 20  # every test scene has one object
    cross = [k for k in m["values"] if k.startswith(("cross", "self", "joint"))]
    assert len(cross) == 15 and all(0.0 <= m["values"][k] <= 1.0 for k in cross)
    assert {"classifier_colour", "classifier_shape"} <= set(m["values"])
    assert (shards / "classifiers" / "image-colour.pt").is_file()
    assert (shards / "classifiers" / "image-shape.json").is_file()
    files = out["metrics"]["pictures"]["files"]
    assert "eval/reconstructions_captions.json" in files and "eval/prior_samples_caption.txt" in files
    assert "| attributes / cross_image_to_caption_colour |" in (run / "report.md").read_text()
    with pytest.raises(ValueError, match="attributes needs image and caption"):
        evaluate_run(toy_run, ["attributes"])


def test_report_shows_subset_metrics_as_one_row_per_number_of_given_modalities():
    """The main table keeps the headline keys; the directions S -> m go to the subset table."""
    by_size = {"1": {"mean": 0.5, "subsets": {"a": 0.25, "b": 0.75}}}
    payload = {"run_dir": "runs/x", "model": "m", "modalities": ["a", "b"], "dataset": "d",
               "metrics": {"subset_coherence": {
                   "values": {"cond_a_to_b": 0.25, "cond_b_to_a": 0.75, "given_1": 0.5, "joint": 0.1},
                   "headline": ["given_1", "joint"], "by_size": by_size}}}
    text = render_report(payload)
    assert "| subset_coherence / given_1 | 50.0% |" in text and "cond_a_to_b |" not in text
    assert "| 1 | 50.0% | a 25.0%, b 75.0% |" in text
    assert "| none (prior samples, all agree) | 10.0% | |" in text
