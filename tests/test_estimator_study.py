"""The estimator seed-study driver (launch/estimator_study.py) and its table (mmvae/eval/study.py)."""
import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from mmvae.eval import study

ROOT = Path(__file__).resolve().parent.parent


def _launcher(name="estimator_study"):
    return importlib.import_module(f"mmvae.cli.{name}")


def test_paired_differences_are_taken_seed_by_seed():
    records = [{"budget": "3ep", "variant": v, "seed": s, "values": {"m/x": x}}
               for v, s, x in [("a", 1, 10.0), ("a", 2, 20.0), ("a", 3, 30.0),
                               ("b", 1, 11.0), ("b", 2, 22.0), ("b", 3, 33.0)]]
    out = study.summarise(records, reference="a")
    (cell_b,) = [c for c in out["cells"] if c["variant"] == "b"]
    assert (cell_b["mean"], cell_b["sd"], cell_b["n"]) == (22.0, 11.0, 3)
    (p,) = out["paired"]
    # differences 1, 2, 3: far smaller spread than the variants' own (sd 10 and 11)
    assert (p["mean_diff"], p["sd_diff"], p["n"]) == (2.0, 1.0, 3)
    assert p["t"] == pytest.approx(2.0 / (1.0 / math.sqrt(3)))
    table = study.markdown(out)
    assert "| 3ep | b | 3 | 22 ± 11 |" in table and "2 ± 1 (3.5)" in table


def test_unknown_variant_is_one_line_exit_2(capsys):
    assert _launcher().main(["--config", "configs/demo.yaml", "--variants", "unbiased,nope",
                             "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


@pytest.mark.slow  # four processes (two trainings, two evaluations) and grad_snr: ~30 s here, more under load
def test_tiny_study_trains_evaluates_and_tabulates_each_run_once(shards, tmp_path):
    out = tmp_path / "study"
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--variants", "stl,iwae",
            "--seeds", "1", "--budgets", "1", "--max-steps", "2", "--out", str(out),
            "--metrics", "likelihood",
            "--train", f"data.shards={shards}", "data.builtin=", "data.batch_size=4",
            "objective.K=2", "train.test_every=0", "train.adam_eps=1e-9",
            "--eval", "eval.iwae_K=4", "eval.k_chunk=4", "eval.max_datapoints=4"]
    main = _launcher().main
    assert main(argv) == 0
    payload = json.loads((out / "study.json").read_text())
    assert [(r["variant"], r["seed"]) for r in payload["records"]] == [("stl", 1), ("iwae", 1)]
    for r in payload["records"]:
        assert r["values"] and all(math.isfinite(v) for v in r["values"].values())
        cfg = (out / "1ep" / r["variant"] / "seed1" / "config.yaml").read_text()
        assert ("dreg_variant: stl" in cfg) == (r["variant"] == "stl")
        assert "name: iwae" in cfg if r["variant"] == "iwae" else "name: dreg" in cfg
    assert "| 1ep | iwae | 1 |" in (out / "study.md").read_text()
    stages = [json.loads(line)["stage"] for line in (out / "timings.jsonl").read_text().splitlines()]
    assert stages == ["train", "evaluate", "train", "evaluate"]
    # a second call finds everything done: no new process, the same table
    assert main(argv) == 0
    assert len((out / "timings.jsonl").read_text().splitlines()) == 4
    # train.adam_eps reached the optimiser the loop built (and amsgrad stayed on)
    run = out / "1ep" / "stl" / "seed1"
    group = torch.load(run / "checkpoints" / "000000002" / "optimizer.bin",
                       weights_only=True)["param_groups"][0]
    assert (group["eps"], group["amsgrad"]) == (1e-9, True)
    # grad_snr reads the run's checkpoints: step 2 is the final model, init is not
    snr_json = tmp_path / "snr.json"
    assert _launcher("grad_snr").main(["--run", str(run), "--points", "all", "--draws", "3",
                                       "--K", "2", "--batch-size", "4", "--out", str(snr_json)]) == 0
    points = {p["point"]: p for p in json.loads(snr_json.read_text())["points"]}
    assert list(points) == ["init", "2", "final"]
    assert points["2"]["snr"] == points["final"]["snr"]
    assert points["init"]["snr"] != points["final"]["snr"]
