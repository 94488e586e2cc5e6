"""Raw ``.npy`` image encoding (issue 15): lossless against PNG, recorded in the manifest,
hostile payloads refused like a bad PNG, the shard scripts' --encoding option; and the fast tar
member reader against Python's tarfile."""
from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile

import numpy as np
import pytest
import torch

from mmvae.data.checks import sample_problems
from mmvae.data.errors import ShardDataError
from mmvae.data.pipeline import make_loader
from mmvae.data.recipes.digits import build_digits
from mmvae.data.recipes.polydigits import build_polydigits
from mmvae.data.samples import decode_npy_image, encode_npy_image, npy_header
from mmvae.data.tarread import tar_members
from test_pipeline import rewrite_member

TINY = dict(sources_per_class=6, pairs_per_instance=2, train_shards=2, test_shards=2, progress=False)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The same tiny digits recipe built twice: PNG and npy images."""
    root = tmp_path_factory.mktemp("enc")
    return {enc: (root / enc, build_digits(root / enc, encoding=enc, **TINY)) for enc in ("png", "npy")}


def _eval_batches(folder, modalities, **kw):
    return list(make_loader(folder, "test", batch_size=7, modalities=modalities, shuffle=False,
                            drop_last=False, return_keys=True, **kw))


def test_npy_shards_give_exactly_the_png_shards_tensors_sample_for_sample(digits):
    png, npy = (_eval_batches(digits[enc][0], ["mnist", "svhn"]) for enc in ("png", "npy"))
    assert len(png) == len(npy) > 1
    for a, b in zip(png, npy):
        assert a["__key__"] == b["__key__"]
        for name in ("mnist", "svhn", "label"):
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert png[0]["mnist"].shape[1:] == (1, 28, 28) and png[0]["svhn"].shape[1:] == (3, 32, 32)


def test_polydigits_npy_and_png_shards_decode_to_the_same_tensors(tmp_path):
    kw = dict(train_samples=40, test_samples=12, sources_per_class=30, train_shards=2, test_shards=2,
              progress=False)
    for enc in ("png", "npy"):
        build_polydigits(tmp_path / enc, encoding=enc, **kw)
    mods = [f"m{i}" for i in range(5)]
    for a, b in zip(*(_eval_batches(tmp_path / enc, mods) for enc in ("png", "npy"))):
        assert a["__key__"] == b["__key__"] and all(torch.equal(a[m], b[m]) for m in mods + ["label"])


def test_the_manifest_records_each_image_file_s_encoding(digits):
    png, npy = digits["png"][1], digits["npy"][1]
    assert npy["sample_keys"] == ["label.cls", "mnist.npy", "svhn.npy"]
    assert npy["spec"]["mnist.npy"] == {"kind": "image", "shape": [1, 28, 28], "dtype": "uint8",
                                        "encoding": "npy", "layout": "CHW"}
    assert npy["spec"]["svhn.npy"]["encoding"] == "npy" and npy["params"]["encoding"] == "npy"
    assert npy["params"]["modalities"]["mnist"]["key"] == "mnist.npy"
    assert png["spec"]["mnist.png"]["encoding"] == "png" and png["params"]["encoding"] == "png"
    assert png["sample_keys"] == ["label.cls", "mnist.png", "svhn.png"]


def test_npy_shards_are_larger_than_png_by_a_bounded_factor(digits):
    size = {enc: sum(s["bytes"] for s in m["splits"]["train"]["shards"]) for enc, (_, m) in digits.items()}
    assert size["png"] < size["npy"] < 2 * size["png"]


def test_a_npy_file_without_the_image_encoding_is_still_a_float_array(tmp_path, tiny):
    """feature.npy (CUB features) keeps its meaning: only the spec's encoding makes an image."""
    from mmvae.data.writer import write_manifest, write_shards

    samples = [{**tiny.sample(i), "feature.npy": encode_npy_image(np.full((1, 2, 2), i, np.uint8))}
               for i in range(4)]
    shards = write_shards(samples, tmp_path, "test", total=4, progress=False)
    manifest = write_manifest(tmp_path, "t", {}, {"test": shards}, sample_keys=list(samples[0])[1:])
    assert manifest["spec"]["feature.npy"]["kind"] == "array"
    batch = _eval_batches(tmp_path, ["feature"])[0]
    assert batch["feature"].dtype == torch.float32 and batch["feature"][3].max() == 3


# ------------------------------------------------------------------------- hostile .npy
def _pickled_object_array() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


class _Boom:
    def __reduce__(self):  # would run at unpickling time
        return (exec, ("open('PWNED', 'w').write('x')",))


def _pickle_payload() -> bytes:
    """An .npy whose header says object dtype and whose body is a hostile pickle."""
    return npy_header((1,), "O") + pickle.dumps(np.array([_Boom()], dtype=object))


HOSTILE = {
    "object dtype (pickle)": (_pickled_object_array, "object dtype"),
    "hostile pickle payload": (_pickle_payload, "object dtype"),
    "truncated": (lambda: encode_npy_image(np.zeros((1, 28, 28), np.uint8))[:-100], "truncated"),
    "header asks for terabytes": (lambda: npy_header((10**6, 10**6, 10**6)) + b"\0" * 64, "announces"),
    "not npy at all": (lambda: b"\x89PNG garbage", "cannot decode"),
    "wrong shape": (lambda: encode_npy_image(np.zeros((1, 27, 28), np.uint8)), "has shape (1, 27, 28)"),
    "wrong dtype": (lambda: npy_header((1, 28, 28), "<f4") + bytes(4 * 784), "has dtype float32"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_npy_image_is_counted_and_skipped_or_raised_in_one_line(case, digits, tmp_path, caplog,
                                                                          monkeypatch):
    import shutil

    make, reason = HOSTILE[case]
    folder = tmp_path / "npy"
    shutil.copytree(digits["npy"][0], folder)
    shard = folder / "test-000000.tar"
    with tarfile.open(shard) as tar:
        victim = next(m.name for m in tar.getmembers() if m.name.endswith("mnist.npy"))
    rewrite_member(shard, lambda name, data: make() if name == victim else data)
    key = victim.split(".")[0]
    monkeypatch.chdir(tmp_path)
    total = digits["npy"][1]["splits"]["test"]["num_samples"]
    with caplog.at_level(logging.WARNING, logger="mmvae.data"):
        loader = make_loader(folder, "test", batch_size=7, modalities=["mnist", "svhn"], shuffle=False,
                             drop_last=False, return_keys=True)
        keys = [k for batch in loader for k in batch["__key__"]]
    assert len(keys) == total - 1 and key not in keys and loader.errors == 1
    assert key in caplog.text and reason in caplog.text
    with pytest.raises(ShardDataError) as err:
        list(make_loader(folder, "test", batch_size=7, modalities=["mnist"], shuffle=False, drop_last=False,
                         on_error="raise"))
    assert "test-000000.tar" in str(err.value) and key in str(err.value) and "\n" not in str(err.value)
    problems = list(sample_problems(folder, ["test"]))
    assert len(problems) == 1 and key in problems[0] and reason in problems[0]
    assert not (tmp_path / "PWNED").exists()


def test_a_fortran_order_npy_image_decodes_to_the_same_pixels():
    image = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(image))
    assert np.array_equal(decode_npy_image(buf.getvalue()), image)
    assert encode_npy_image(image) == _np_save(image)  # what the fast path compares against


def _np_save(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_a_manifest_naming_an_unknown_encoding_is_refused_in_one_line(digits, tmp_path):
    import shutil

    from mmvae.data.errors import ShardsError

    folder = tmp_path / "npy"
    shutil.copytree(digits["npy"][0], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["spec"]["mnist.npy"]["encoding"] = "zstd-raw"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardsError, match="names image encoding 'zstd-raw'; this version reads") as err:
        make_loader(folder, "test", batch_size=4, modalities=["mnist"])
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------- shard scripts
@pytest.mark.parametrize("script,argv,message", [
    ("shard_demo", ["--dataset", "digits", "--encoding", "jpg"], "invalid choice: 'jpg'"),
    ("shard_demo", ["--dataset", "shapes", "--encoding", "npy"], "--encoding applies to --dataset digits"),
    ("shard_mnist_svhn", ["--mnist", "a", "--svhn", "b", "--encoding", "raw"], "invalid choice: 'raw'"),
    ("shard_polymnist", ["--polymnist", "a", "--encoding", "NPY"], "invalid choice: 'NPY'"),
])
def test_a_bad_encoding_option_is_one_line_and_exit_2(script, argv, message, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"mmvae.cli.{script}").main
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_shard_scripts_pass_the_encoding_to_their_recipe(tmp_path):
    from mmvae.cli import shard_demo, shard_mnist_svhn, shard_polymnist

    assert shard_mnist_svhn.parse_args(["--mnist", "a", "--svhn", "b", "--out", "o"]).encoding == "npy"
    assert shard_mnist_svhn.parse_args(["--mnist", "a", "--svhn", "b", "--out", "o",
                                        "--encoding", "png"]).encoding == "png"
    assert shard_polymnist.parse_args(["--polymnist", "a", "--out", "o"]).encoding == "npy"
    out = tmp_path / "poly"
    assert shard_demo.main(["--dataset", "polydigits", "--out", str(out), "--samples", "30", "10",
                            "--encoding", "png"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["encoding"] == "png" and "m0.png" in manifest["sample_keys"]


# ------------------------------------------------------------------------- tar reader
def _tar(members, fmt) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [("00000001.mnist.npy", b"a" * 700, tarfile.REGTYPE), ("dir", b"", tarfile.DIRTYPE),
           ("__meta__", b"skip me", tarfile.REGTYPE),
           ("sub/" + "k" * 150 + ".svhn.png", b"b" * 512, tarfile.REGTYPE),     # long name
           ("0000000\u00e9.label.cls", b"3", tarfile.REGTYPE), ("empty.txt", b"", tarfile.REGTYPE)]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_tar_reader_yields_what_tarfile_yields(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100]
    data = _tar(members, fmt)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg() and m.name != "__meta__"]
    assert list(tar_members(io.BytesIO(data))) == expected and len(expected) == len(members) - 2


def test_the_tar_reader_names_a_truncated_or_corrupt_tar():
    data = _tar(MEMBERS, tarfile.PAX_FORMAT)
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(tar_members(io.BytesIO(data[:1000])))
    corrupt = bytearray(data)
    corrupt[3 * 512 + 124] ^= 0x07  # a size digit of a later header: its checksum fails
    with pytest.raises(tarfile.ReadError, match="bad checksum|invalid header"):
        list(tar_members(io.BytesIO(bytes(corrupt))))
    with pytest.raises(tarfile.ReadError, match="empty file"):
        list(tar_members(io.BytesIO(b"")))


def test_the_fast_header_byte_sum_equals_sum_on_any_block():
    from mmvae.data.tarread import _byte_sum

    rng = np.random.default_rng(0)
    blocks = [bytes(512), b"\xff" * 512, _tar(MEMBERS, tarfile.PAX_FORMAT)[:512]]
    blocks += [rng.integers(0, 256, 512, dtype=np.uint8).tobytes() for _ in range(300)]
    blocks += [rng.choice(np.array([0, 0, 48, 200, 255], np.uint8), 512).tobytes() for _ in range(300)]
    assert all(_byte_sum(b) == sum(b) for b in blocks)


def test_the_fast_tar_reader_gives_the_loader_exactly_the_webdataset_reader_s_batches(digits):
    for enc in ("png", "npy"):
        ref, fast = (_eval_batches(digits[enc][0], ["mnist", "svhn"], tar_reader=reader)
                     for reader in ("webdataset", "fast"))
        assert len(ref) == len(fast) > 1
        for a, b in zip(ref, fast):
            assert a["__key__"] == b["__key__"]
            assert all(torch.equal(a[n], b[n]) for n in ("mnist", "svhn", "label"))
