"""Missing modalities through launch/train.py on tiny digits shards: data.drop_modalities on one
process (moe, and moe_plus with the cv DReG) and with the K particles split over two (P=2 equals
one process), shards that really omit keys (manifest flag `missing_modalities`), and every
fusion and dreg variant accepted with missing modalities."""
import hashlib
import io
import json
import shutil
import tarfile

import pytest
import torch

from mmvae.config import load_config
from test_fusions_train import assert_p2_equals_one_process, overrides
from test_resume import DEMO, events, train_main


def train_bounds(run_dir):
    return [e["bound"] for e in events(run_dir) if e["split"] == "train"]


@pytest.mark.parametrize("fusion,variant", [("moe", "unbiased"), ("moe_plus", "cv")])
def test_drop_modalities_trains_on_one_process_and_changes_what_is_seen(shards, tmp_path,
                                                                        fusion, variant):
    common = ["objective.name=dreg", "objective.K=2", f"objective.dreg_variant={variant}"]
    for name, rate in (("full", "0"), ("drop", "0.3")):
        assert train_main(["--config", str(DEMO), *overrides(
            shards, tmp_path / name, fusion, *common, f"data.drop_modalities={rate}")]) == 0
    full, drop = train_bounds(tmp_path / "full"), train_bounds(tmp_path / "drop")
    assert len(drop) == 3 and all(torch.isfinite(torch.tensor(drop)))
    assert drop != full  # the same batches and noise: only the mask differs
    test = [e for e in events(tmp_path / "drop") if e["split"] == "test"]
    assert test and test[-1]["data_errors"] == 0


@pytest.mark.parametrize("fusion,variant", [("moe", "unbiased"), ("mopoe", "unbiased"),
                                            ("moe_plus", "swap")])
def test_two_particle_shards_with_dropped_modalities_equal_one_process(shards, tmp_path, fusion,
                                                                        variant):
    # Adam's first steps move every weight by ~lr (1e-3) times g / (|g| + eps): for the few
    # elements whose gradient is near eps, the fp32 rounding of the two layouts' sums shows up
    # in the weight (measured: 1 of 8,192 elements off by 1.4e-5 after 3 steps, mopoe). A wrong
    # particle or mask would move the bounds and many weights by ~lr.
    assert_p2_equals_one_process(shards, tmp_path, fusion, "objective.name=dreg",
                                 "objective.looser=true", "objective.K=2",
                                 f"objective.dreg_variant={variant}",
                                 "data.drop_modalities=0.3", weights_atol=1e-4)


def omit_keys(src, dst, every: int = 3) -> int:
    """A copy of the shards where every `every`-th sample lacks svhn.png (and the one after it
    mnist.png), with the manifest's sizes, hashes and flag updated. Returns how many omitted."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    count = 0
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            path = dst / entry["file"]
            with tarfile.open(path) as tar:
                members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
            keys = sorted({m.name.partition(".")[0] for m, _ in members})
            gone = {(k, "svhn") for k in keys[::every]} | {(k, "mnist") for k in keys[1::every]}
            with tarfile.open(path, "w") as tar:
                for member, data in members:
                    key, _, ext = member.name.partition(".")
                    if (key, ext.partition(".")[0]) in gone:  # svhn.npy or svhn.png
                        count += 1
                        continue
                    tar.addfile(member, io.BytesIO(data))
            entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    manifest["missing_modalities"] = True
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return count


@pytest.mark.parametrize("fusion,objective", [("poe", "elbo"), ("mopoe", "iwae")])
def test_shards_that_omit_keys_train_with_the_mask(shards, tmp_path, fusion, objective):
    partial = tmp_path / "partial"
    assert omit_keys(shards, partial) > 10
    run_dir = tmp_path / "run"
    assert train_main(["--config", str(DEMO), *overrides(
        partial, run_dir, fusion, f"objective.name={objective}", "objective.K=2",
        "data.on_error=raise")]) == 0
    seen = events(run_dir)
    assert all(torch.isfinite(torch.tensor(e["bound"])) for e in seen if "bound" in e)
    assert [e for e in seen if e["split"] == "test"][-1]["data_errors"] == 0


@pytest.mark.parametrize("fusion", ["moe", "mopoe", "poe", "moe_plus"])
@pytest.mark.parametrize("variant", ["unbiased", "paper", "stl", "cv", "swap"])
def test_every_fusion_and_dreg_variant_loads_with_dropped_modalities(fusion, variant):
    looser = "true" if variant == "swap" else "false"
    cfg = load_config(None, [f"model.fusion={fusion}", "objective.name=dreg",
                             f"objective.dreg_variant={variant}", f"objective.looser={looser}",
                             "data.drop_modalities=0.3"])
    assert (cfg.model.fusion, cfg.objective.dreg_variant) == (fusion, variant)


def test_drop_modalities_out_of_range_or_on_one_modality_is_exit_2(shards, tmp_path, capsys):
    assert train_main(["--config", str(DEMO), *overrides(
        shards, tmp_path / "a", "moe", "data.drop_modalities=1")]) == 2
    assert "data.drop_modalities=1.0 must be in [0, 1)" in capsys.readouterr().err
    assert train_main(["--config", str(DEMO), *overrides(
        shards, tmp_path / "b", "moe", "model.name=mnist", "data.drop_modalities=0.2")]) == 2
    err = capsys.readouterr().err
    assert "needs a multimodal model" in err and len(err.strip().splitlines()) == 1


def test_evaluation_batches_hold_only_the_samples_with_every_modality(shards, tmp_path):
    """launch/evaluate.py's metrics read through EvalContext: on shards that omit keys they see
    the complete samples, never a placeholder."""
    import mmvae
    from mmvae.config import load_config
    from mmvae.eval.context import EvalContext

    partial = tmp_path / "partial"
    omit_keys(shards, partial)
    cfg = load_config(None, [f"data.shards={partial}", "model.name=mnist_svhn"])
    ctx = EvalContext(tmp_path, cfg, mmvae.build_model("mnist_svhn"), cfg.eval, 0,
                      torch.device("cpu"))
    manifest = json.loads((partial / "manifest.json").read_text())
    total = manifest["splits"]["test"]["num_samples"]
    seen = [(xs, labels) for xs, labels in ctx.labelled_batches("test", batch_size=4)]
    n = sum(len(labels) for _, labels in seen)
    # omit_keys takes svhn from every third sample of a shard and mnist from the one after it
    per_shard = [e["count"] for e in manifest["splits"]["test"]["shards"]]
    assert n == sum(c - len(range(0, c, 3)) - len(range(1, c, 3)) for c in per_shard) < total
    assert all(x.flatten(1).amax(1).gt(0).all() for xs, _ in seen for x in xs)
