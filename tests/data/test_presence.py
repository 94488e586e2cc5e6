"""Missing modalities in the pipeline: shards that omit keys (when the manifest allows it) and
data.drop_modalities give a (B, M) presence mask with zero placeholders; a dataset declared
complete keeps treating a missing key as a data error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import png, tiny_images
from mmvae.data.pipeline import make_loader
from mmvae.data.presence import PRESENT, DropModalities
from mmvae.data.writer import write_manifest, write_shards

MODS = ["mnist", "svhn"]
SPEC = {"mnist.png": {"kind": "image", "shape": [1, 28, 28], "dtype": "uint8"},
        "svhn.png": {"kind": "image", "shape": [3, 32, 32], "dtype": "uint8"},
        "label.cls": {"kind": "int"}}


def omitted(i: int) -> set[str]:
    """What sample i lacks: every third sample has no svhn, every fifth no mnist, sample 15
    (a multiple of both) nothing at all."""
    return {m for m, n in (("svhn", 3), ("mnist", 5)) if i % n == 0 and i > 0}


def partial_shards(out, flag: bool, n: int = 16, shards: int = 2):
    entries = []
    per = n // shards
    for s in range(shards):
        samples = []
        for i in range(s * per, (s + 1) * per):
            mnist, svhn = tiny_images(i)
            sample = {"__key__": f"{i:08d}", "mnist.png": png(mnist), "svhn.png": png(svhn),
                      "label.cls": i % 10}
            for m in omitted(i):
                del sample[f"{m}.png"]
            samples.append(sample)
        tmp = out / f"_{s}"
        (entry,) = write_shards(samples, tmp, "train", total=per, progress=False)
        name = f"train-{s:06d}.tar"
        (tmp / entry["file"]).rename(out / name)
        entries.append({**entry, "file": name})
    write_manifest(out, "partial", {}, {"train": entries}, sample_keys=list(SPEC), spec=SPEC,
                   missing_modalities=flag)
    return out


def read_all(loader):
    rows = {}
    for batch in loader:
        for j, key in enumerate(batch["__key__"]):
            rows[int(key)] = {m: batch[m][j] for m in MODS} | {PRESENT: batch.get(PRESENT, [None] * 99)[j]}
    return rows


def test_shards_that_omit_keys_give_the_mask_and_zero_placeholders(tmp_path):
    shards = partial_shards(tmp_path, flag=True)
    loader = make_loader(shards, "train", batch_size=4, modalities=MODS, shuffle=False,
                         drop_last=False, return_keys=True)
    rows = read_all(loader)
    assert sorted(rows) == [i for i in range(16) if i != 15]  # 15 has no modality: an error
    assert loader.errors == 1
    for i, row in rows.items():
        want = [m not in omitted(i) for m in MODS]
        assert row[PRESENT].tolist() == want and row[PRESENT].dtype == torch.bool
        for m, image in zip(MODS, tiny_images(i)):
            if m in omitted(i):
                assert image.shape == tuple(row[m].shape) and not row[m].any()
            else:
                torch.testing.assert_close(row[m], torch.from_numpy(image).float() / 255)


def test_a_dataset_declared_complete_still_counts_a_missing_key_as_an_error(tmp_path):
    shards = partial_shards(tmp_path, flag=False)
    loader = make_loader(shards, "train", batch_size=4, modalities=MODS, shuffle=False,
                         drop_last=False, return_keys=True)
    rows = read_all(loader)
    assert sorted(rows) == [i for i in range(16) if not omitted(i)]
    assert loader.errors == 16 - len(rows)
    with pytest.raises(Exception, match="missing key"):
        list(make_loader(shards, "train", batch_size=4, modalities=MODS, shuffle=False,
                         drop_last=False, on_error="raise"))


def test_evaluation_reads_only_the_samples_with_every_modality_it_asks_for(tmp_path):
    shards = partial_shards(tmp_path, flag=True)
    both = read_all(make_loader(shards, "train", batch_size=4, modalities=MODS, shuffle=False,
                                drop_last=False, return_keys=True, incomplete="skip"))
    assert sorted(both) == [i for i in range(16) if not omitted(i)]
    assert all(row[PRESENT] is None for row in both.values())  # no mask: nothing is absent
    mnist = make_loader(shards, "train", batch_size=4, modalities=["mnist"], shuffle=False,
                        drop_last=False, return_keys=True, incomplete="skip")
    keys = [int(k) for b in mnist for k in b["__key__"]]
    assert keys == [i for i in range(16) if "mnist" not in omitted(i)] and mnist.errors == 0


def masks_of(loader) -> dict[int, tuple]:
    return {int(k): tuple(p.tolist()) for b in loader for k, p in zip(b["__key__"], b[PRESENT])}


def test_drop_modalities_is_seeded_per_sample_and_epoch_whatever_the_layout(tiny_dir):
    def loader(**kw):
        return make_loader(tiny_dir, "train", batch_size=2, modalities=MODS, return_keys=True,
                           drop_modalities=0.5, seed=3, **kw)

    one = masks_of(loader())
    split = {}
    for rank in range(2):
        split |= masks_of(loader(dp_rank=rank, dp_size=2, num_workers=1))
    assert split == {k: one[k] for k in split} and len(split) > 4
    assert masks_of(loader(shuffle=False)) == one  # order does not matter either
    later = loader()
    later.set_epoch(1)
    assert masks_of(later) != one  # another epoch, other modalities
    assert all(any(row) for row in one.values())  # never all of a sample's
    assert {row for row in one.values()} == {(True, True), (True, False), (False, True)}


def test_drop_modalities_drops_at_the_rate_and_never_everything():
    class State:
        seed, epoch = 0, 0

    stage = DropModalities(0.3, ["a", "b", "c"], State())
    drops = np.array([[m in stage.dropped(f"{i:06d}", ["a", "b", "c"]) for m in "abc"]
                      for i in range(4000)])
    assert abs(drops.mean() - 0.3) < 0.02 and not drops.all(1).any()
    assert stage.dropped("x", ["b"]) == []  # a last modality stays
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropModalities(1.0, ["a", "b"], State())


def test_a_zero_rate_on_a_complete_dataset_adds_no_mask(tiny_dir):
    batch = next(iter(make_loader(tiny_dir, "train", batch_size=4, modalities=MODS)))
    assert PRESENT not in batch
    masked = next(iter(make_loader(tiny_dir, "train", batch_size=4, modalities=MODS,
                                   drop_modalities=0.3)))
    assert masked[PRESENT].shape == (4, 2)


@pytest.mark.parametrize("flag", [True, False])
def test_verify_samples_reports_a_missing_modality_only_where_the_manifest_forbids_it(tmp_path, flag):
    from mmvae.data.checks import sample_problems

    problems = list(sample_problems(partial_shards(tmp_path, flag=flag)))
    want = [15] if flag else [i for i in range(16) if omitted(i)]
    assert [int(p.split("sample ")[1].split(":")[0]) for p in problems] == want
    assert all("missing" in p for p in problems)
