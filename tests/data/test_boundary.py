"""The data boundary (DESIGN.md): a corruption matrix over the built-in digits and shapes_ft
shards, through the loader, training (launch/train.py), launch/evaluate.py and
`python -m mmvae.data verify`: every lost sample counted with its shard named, one-line errors
with the right exit code, nothing opened outside the folder, no run folder on bad input."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmvae.data.__main__ import main as data_main
from mmvae.data.checks import check_shards
from mmvae.data.errors import ShardDataError, ShardsError
from mmvae.data.pipeline import make_loader

ROOT = Path(__file__).resolve().parents[2]
SHARD = "test-000001.tar"  # every case damages this shard of the test split
MODALITIES = {"digits": ["mnist", "svhn"], "shapes_ft": ["feature", "caption"]}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Tiny built-in shards, built once: digits (test: 2 shards of 5; PNG images, whose damage
    these cases model -- test_encoding.py damages .npy ones) and shapes_ft (test: 2 shards of 10)."""
    from mmvae.data.recipes.digits import build_digits
    from mmvae.data.recipes.shapes import build_shapes

    root = tmp_path_factory.mktemp("pristine")
    build_digits(root / "digits", pairs_per_instance=1, sources_per_class=4, train_shards=4,
                 test_shards=2, encoding="png", progress=False)
    build_shapes(root / "shapes_ft", train_scenes=4, test_scenes=2, features=True, min_shards=2,
                 progress=False)
    return root


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _entry(manifest: dict, name: str = SHARD) -> dict:
    return next(e for e in manifest["splits"]["test"]["shards"] if e["file"] == name)


def _samples(path: Path) -> list[list[tarfile.TarInfo]]:
    """The shard's members grouped by sample, in order."""
    groups: dict[str, list] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            groups.setdefault(member.name.split(".", 1)[0], []).append(member)
    return list(groups.values())


def _rebuild(path: Path, key: str, fn) -> None:
    """A shard written with bad data in it: member ``key`` of sample 1 replaced by fn(data);
    the manifest records the new size and sha256 (only the per-sample checks can tell)."""
    name = _samples(path)[1][0].name.split(".", 1)[0] + "." + key
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = fn(data) if member.name == name else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    manifest = _manifest(path.parent)
    _entry(manifest).update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (path.parent / "manifest.json").write_text(json.dumps(manifest))


def _set_file(folder: Path, name: str) -> None:
    manifest = _manifest(folder)
    _entry(manifest)["file"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _png(shape) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# --------------------------------------------------------------------------- the damage
# Each returns how many of the shard's samples cannot be delivered. Kinds: "size" (the shard's
# size no longer matches: caught at start under raise), "stream" (same size: caught while
# streaming), "sample" (bad data written at build time: shard and manifest agree), "fatal"
# (bad input: exit 2, nothing written, whatever data.on_error), "sha256" (with data.verify=sha256).
def truncated_at_block(folder):
    path, samples = folder / SHARD, _samples(folder / SHARD)
    path.write_bytes(path.read_bytes()[:samples[3][0].offset])  # a 512-byte boundary: tar stays readable
    return len(samples) - 3


def truncated_mid_member(folder):
    path, samples = folder / SHARD, _samples(folder / SHARD)
    member = samples[2][1]
    path.write_bytes(path.read_bytes()[:member.offset_data + member.size // 2])
    return len(samples) - 2


def garbage_bytes(folder):
    path, samples = folder / SHARD, _samples(folder / SHARD)
    data = bytearray(path.read_bytes())
    start = samples[2][0].offset
    data[start:start + 600] = np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))  # same size: the size check passes, tarfile stops quietly
    return len(samples) - 2


def flipped_image_byte(folder):
    path, samples = folder / SHARD, _samples(folder / SHARD)
    png = next(m for m in samples[1] if m.name.endswith("mnist.png"))
    data = bytearray(path.read_bytes())
    data[png.offset_data + 17] ^= 0x01  # in the IHDR chunk (its CRC no longer matches)
    path.write_bytes(bytes(data))
    return 1


def wrong_image_shape(folder):
    _rebuild(folder / SHARD, "mnist.png", lambda data: _png((10, 10)))
    return 1


def long_caption(folder):
    _rebuild(folder / SHARD, "caption.json", lambda data: json.dumps(list(range(3, 43))).encode())
    return 1


def non_utf8_caption(folder):
    _rebuild(folder / SHARD, "caption.json", lambda data: b"\xff\xfe" + data)
    return 1


def nan_feature(folder):
    _rebuild(folder / SHARD, "feature.npy", lambda data: _npy(np.full(2048, np.nan, np.float32)))
    return 1


def missing_shard(folder):
    (folder / SHARD).unlink()
    return None


def pipe_name(folder):
    name = "pipe:touch PWNED"
    shutil.copy(folder / SHARD, folder / name)  # so that an existence check alone would pass
    _set_file(folder, name)
    return None


def dotdot_name(folder):
    shutil.copy(folder / SHARD, folder.parent / "outside-000001.tar")
    _set_file(folder, "../outside-000001.tar")
    return None


def absolute_name(folder):
    shutil.copy(folder / SHARD, folder.parent / "elsewhere.tar")
    _set_file(folder, str(folder.parent / "elsewhere.tar"))
    return None


def wrong_sha256(folder):
    manifest = _manifest(folder)
    _entry(manifest)["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return 0  # the data are intact: nothing is lost, the mismatch is reported


CASES = {  # name: (dataset, damage, kind)
    "truncated at a block boundary": ("digits", truncated_at_block, "size"),
    "truncated mid-member": ("digits", truncated_mid_member, "size"),
    "truncated caption shard": ("shapes_ft", truncated_at_block, "size"),
    "garbage bytes": ("digits", garbage_bytes, "stream"),
    "a flipped image byte": ("digits", flipped_image_byte, "stream"),
    "wrong image shape": ("digits", wrong_image_shape, "sample"),
    "over-long caption": ("shapes_ft", long_caption, "sample"),
    "non-UTF-8 caption": ("shapes_ft", non_utf8_caption, "sample"),
    "NaN feature": ("shapes_ft", nan_feature, "sample"),
    "missing shard": ("digits", missing_shard, "fatal"),
    "pipe: name": ("digits", pipe_name, "fatal"),
    "../ name": ("digits", dotdot_name, "fatal"),
    "absolute name": ("digits", absolute_name, "fatal"),
    "wrong sha256": ("digits", wrong_sha256, "sha256"),
}
FATAL_WORDS = {"missing shard": "missing", "pipe: name": "pipe:touch PWNED",
               "../ name": "../outside-000001.tar", "absolute name": "elsewhere.tar"}


@pytest.fixture(params=list(CASES))
def damaged(request, pristine, tmp_path):
    """(case, kind, folder, lost, total test samples) for a damaged copy of the shards."""
    dataset, damage, kind = CASES[request.param]
    folder = tmp_path / dataset
    shutil.copytree(pristine / dataset, folder)
    total = _manifest(folder)["splits"]["test"]["num_samples"]
    return request.param, kind, folder, damage(folder), total


def _named(case: str, text: str) -> bool:
    return (FATAL_WORDS.get(case) or SHARD) in text


# --------------------------------------------------------------------------- the loader
def _test_loader(folder, on_error, tar_reader="webdataset"):
    dataset = folder.name
    return make_loader(folder, "test", batch_size=4, modalities=MODALITIES[dataset], shuffle=False,
                       drop_last=False, on_error=on_error, return_keys=True, tar_reader=tar_reader)


@pytest.mark.parametrize("tar_reader", ["webdataset", "fast"])
def test_loader_counts_every_lost_sample_or_raises_one_line_naming_the_shard(damaged, tar_reader, caplog):
    case, kind, folder, lost, total = damaged
    if kind == "fatal":
        for on_error in ("skip", "raise"):
            with pytest.raises(ShardsError) as err:
                _test_loader(folder, on_error, tar_reader)
            assert _named(case, str(err.value)) and "\n" not in str(err.value)
        assert not list(folder.parent.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))
        return
    with caplog.at_level(logging.WARNING, logger="mmvae.data"):
        loader = _test_loader(folder, "skip", tar_reader)
        keys = [k for batch in loader for k in batch["__key__"]]
    assert len(keys) == len(set(keys)) == total - lost
    assert loader.errors == lost
    if lost:
        assert SHARD in caplog.text
    if kind == "sha256":  # the loader itself checks sizes only
        return
    with pytest.raises(ShardDataError) as err:
        list(_test_loader(folder, "raise", tar_reader))
    assert SHARD in str(err.value) and "\n" not in str(err.value)


def test_start_check_stops_on_bad_input_and_on_a_mismatch_under_raise(damaged, caplog):
    case, kind, folder, lost, total = damaged
    verify = "sha256" if kind == "sha256" else "size"
    for on_error in ("skip", "raise"):
        stops = kind == "fatal" or (on_error == "raise" and kind in ("size", "sha256"))
        if stops:
            with pytest.raises(ShardsError) as err:
                check_shards(folder, ["train", "test"], verify=verify, on_error=on_error)
            assert _named(case, str(err.value)) and "\n" not in str(err.value)
        else:
            with caplog.at_level(logging.WARNING, logger="mmvae.data"):
                report = check_shards(folder, ["train", "test"], verify=verify, on_error=on_error)
            warned = kind in ("size", "sha256")
            assert (SHARD in " ".join(report.warnings)) == warned
            assert (SHARD in caplog.text) == warned


# --------------------------------------------------------------------------- verify
def test_verify_reports_each_problem_on_its_own_line(damaged, capsys):
    case, kind, folder, lost, total = damaged
    code = data_main(["verify", str(folder)])
    err = capsys.readouterr().err
    expected = {"fatal": 2, "sample": 0}.get(kind, 1)
    if case == "missing shard":
        expected = 1
    assert code == expected, err
    if expected:
        assert _named(case, err) and all(line.startswith("error: ") for line in err.splitlines())
    if kind == "sample":  # shard and manifest agree: only decoding every sample finds it
        assert data_main(["verify", "--samples", str(folder)]) == 1
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and SHARD in lines[0] and "sample" in lines[0]
    assert not list(folder.parent.rglob("PWNED"))


def test_verify_lists_every_manifest_problem_and_opens_nothing(pristine, tmp_path, capsys):
    folder = tmp_path / "digits"
    shutil.copytree(pristine / "digits", folder)
    manifest = _manifest(folder)
    entries = manifest["splits"]["test"]["shards"]
    entries[0]["file"], entries[1]["file"] = "pipe:touch PWNED", "/etc/passwd"
    del manifest["splits"]["train"]["shards"][0]["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert data_main(["verify", str(folder)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4  # three problems, one line each, and the summary
    assert "pipe:touch PWNED" in lines[1] and "/etc/passwd" in lines[2] and "sha256" in lines[0]
    (folder / "manifest.json").write_text(json.dumps({**manifest, "splits": []}))
    assert data_main(["verify", str(folder)]) == 2
    assert "splits" in capsys.readouterr().err
    (folder / "manifest.json").write_text("{not json")
    assert data_main(["verify", str(folder)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# --------------------------------------------------------------------------- training
def _entry_point(name: str):
    """mmvae.cli.<name>.main (what launch/<name>.py runs), in this process."""
    return importlib.import_module(f"mmvae.cli.{name}").main


def _train(folder, run_dir: Path, on_error: str, capsys, *extra, dataset: str = "") -> tuple[int, str]:
    train_main = _entry_point("train")
    dataset = dataset or folder.name
    config = {"digits": "demo.yaml", "shapes_ft": "cubISft.yaml"}[dataset]
    code = train_main(["--config", str(ROOT / "configs" / config), f"data.shards={folder}",
                       "data.builtin=", f"run.dir={run_dir}", "logging.wandb=disabled",
                       "logging.progress=false", "data.batch_size=16", "model.latent_dim=4",
                       "objective.K=2", "train.epochs=1", "train.test_batches=0", "data.num_workers=0",
                       f"data.on_error={on_error}", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_training_counts_lost_samples_or_stops_with_one_line(damaged, on_error, tmp_path, capsys, caplog):
    case, kind, folder, lost, total = damaged
    run_dir = tmp_path / "run"
    extra = ["data.verify=sha256"] if kind == "sha256" else []
    with caplog.at_level(logging.WARNING, logger="mmvae.data"):
        code, err = _train(folder, run_dir, on_error, capsys, *extra)
    if kind == "fatal" or (on_error == "raise" and kind in ("size", "sha256")):
        assert code == 2 and len(err.strip().splitlines()) == 1 and _named(case, err), err
        assert not run_dir.exists()  # checked before anything is written
        return
    if on_error == "raise" and lost:  # found while streaming: a failed run, one line at the end
        last = err.strip().splitlines()[-1]
        assert code == 1 and last.startswith("error: ") and SHARD in last and "Traceback" not in err, err
        return
    assert code == 0, err
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test = [e for e in events if e["split"] == "test"]
    assert test[-1]["data_errors"] == lost and test[-1]["datapoints"] == total - lost
    assert json.loads((run_dir / "summary.json").read_text())["data_errors"] == lost
    if lost or kind == "sha256":
        assert SHARD in caplog.text
    if kind == "sha256":  # data.verify=sha256 says what it read and how long it took
        assert re.search(r"sha256 of .*: \d+\.\d MB checked in \d+\.\d\d s", " ".join(err.split())), err


# --------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def trained(pristine, tmp_path_factory):
    """One short run per dataset on the clean shards, to evaluate on damaged copies."""
    from mmvae.config import load_config
    from mmvae.train.loop import fit

    runs = {}
    for dataset, config in (("digits", "demo.yaml"), ("shapes_ft", "cubISft.yaml")):
        run_dir = tmp_path_factory.mktemp("runs") / dataset
        fit(load_config(ROOT / "configs" / config, [
            f"data.shards={pristine / dataset}", "data.builtin=", f"run.dir={run_dir}",
            "logging.wandb=disabled", "logging.progress=false", "data.batch_size=16",
            "model.latent_dim=4", "objective.K=2", "train.epochs=1", "train.test_every=0",
            "data.num_workers=0"]))
        runs[dataset] = run_dir
    return runs


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_evaluate_counts_lost_samples_or_stops_with_one_line(damaged, on_error, trained, capsys):
    evaluate_main = _entry_point("evaluate")
    case, kind, folder, lost, total = damaged
    run_dir = trained[folder.name]
    (run_dir / "eval.json").unlink(missing_ok=True)
    code = evaluate_main(["--run", str(run_dir), "--metrics", "likelihood", f"data.shards={folder}",
                          f"data.on_error={on_error}", "eval.iwae_K=2", "eval.k_chunk=2",
                          "eval.likelihood_batch=4", "logging.progress=false", "data.num_workers=0",
                          *(["data.verify=sha256"] if kind == "sha256" else [])])
    err = capsys.readouterr().err
    if kind == "fatal" or (on_error == "raise" and kind in ("size", "sha256")):
        assert code == 2 and len(err.strip().splitlines()) == 1 and _named(case, err), err
        assert not (run_dir / "eval.json").exists()
        return
    if on_error == "raise" and lost:
        assert code == 1 and len(err.strip().splitlines()) == 1 and SHARD in err, err
        return
    assert code == 0, err
    likelihood = json.loads((run_dir / "eval.json").read_text())["metrics"]["likelihood"]
    assert likelihood["num_datapoints"] == total - lost


# --------------------------------------------------------------------------- remote shards
@contextlib.contextmanager
def _serve(directory: Path, token: str = ""):
    """``directory`` over HTTP on 127.0.0.1 (a free port) until the block ends: the server
    thread is shut down then, and each request times out after 10 s. With ``token``, a request
    without ``?token=<token>`` gets 403 (like an object store's access token)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        timeout = 10

        def log_message(self, *args):  # no access log on stderr
            pass

        def send_head(self):
            if token and not self.path.endswith(f"?token={token}"):
                self.send_error(403)
                return None
            return super().send_head()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def http_shards(pristine):
    with _serve(pristine / "digits") as prefix:
        yield prefix


@pytest.mark.parametrize("num_workers", [0, 2])
def test_http_prefix_streams_the_same_samples_as_the_local_folder(http_shards, pristine, num_workers):
    def batches(shards):
        return list(make_loader(shards, "train", batch_size=4, modalities=["mnist", "svhn"], seed=3,
                                num_workers=num_workers, return_keys=True))

    local, remote = batches(pristine / "digits"), batches(http_shards)
    assert len(local) == len(remote) > 0
    for a, b in zip(local, remote):
        assert a["__key__"] == b["__key__"]
        for name in ("mnist", "svhn", "label"):
            assert (a[name] == b[name]).all()
    report = check_shards(http_shards, ["train", "test"], verify="sha256", on_error="raise")
    assert report.hashed_bytes == sum(e["bytes"] for s in report.manifest["splits"].values()
                                      for e in s["shards"])


def test_training_from_an_http_prefix_matches_the_local_folder(http_shards, pristine, tmp_path, capsys):
    events = {}
    for name, shards in (("local", pristine / "digits"), ("remote", http_shards)):
        code, err = _train(shards, tmp_path / name, "raise", capsys, "train.max_steps=2",
                           dataset="digits")
        assert code == 0, err
        events[name] = [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert events["local"] == events["remote"] and len(events["local"]) >= 2


def test_a_remote_manifest_cannot_name_anything_but_shards_under_the_prefix(pristine, tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(pristine / "digits", folder)
    _set_file(folder, "http://127.0.0.1:9/elsewhere.tar")
    with _serve(folder) as prefix:
        with pytest.raises(ShardsError, match="elsewhere.tar.*not a shard name"):
            check_shards(prefix, ["test"])
    shutil.copy(pristine / "digits" / "manifest.json", folder / "manifest.json")
    (folder / SHARD).unlink()
    with _serve(folder) as prefix:
        with pytest.raises(ShardsError, match=f"shard {prefix}{SHARD} listed in manifest.json is missing"):
            check_shards(prefix, ["test"])
    (folder / "manifest.json").unlink()
    with _serve(folder) as prefix:
        with pytest.raises(ShardsError, match="no manifest.json"):
            check_shards(prefix, ["test"])


def test_a_token_in_the_prefix_query_goes_with_every_request_and_into_no_message(pristine, tmp_path, caplog):
    folder = tmp_path / "digits"
    shutil.copytree(pristine / "digits", folder)
    lost = truncated_at_block(folder)
    with _serve(folder, token="s3cret") as prefix:
        with pytest.raises(ShardsError, match="HTTP 403"):
            check_shards(prefix, ["test"])
        with caplog.at_level(logging.WARNING, logger="mmvae.data"):
            report = check_shards(prefix + "?token=s3cret", ["train", "test"])
            loader = make_loader(prefix + "?token=s3cret", "test", batch_size=4, modalities=["mnist"],
                                 drop_last=False)
            assert sum(len(b["mnist"]) for b in loader) == 10 - lost and loader.errors == lost
    assert SHARD in report.warnings[0] and SHARD in caplog.text
    assert "s3cret" not in caplog.text + " ".join(report.warnings)


# --------------------------------------------------------------------------- the command line
def _run(args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_pipe_name_from_inside_the_folder_runs_nothing_and_writes_nothing(pristine, tmp_path):
    """The issue's reproduction: data.shards=. from inside a folder whose manifest lists
    'pipe:touch PWNED' (and holds a file of that name)."""
    folder = tmp_path / "digits"
    shutil.copytree(pristine / "digits", folder)
    pipe_name(folder)
    result = _run([str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
                   "data.shards=.", "data.builtin=", "run.dir=run", "logging.wandb=disabled"], cwd=folder)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "pipe:touch PWNED" in result.stderr and "not a shard name" in result.stderr
    assert not (folder / "PWNED").exists() and not (folder / "run").exists()
    result = _run(["-m", "mmvae.data", "verify", "."], cwd=folder)
    assert result.returncode == 2 and "Traceback" not in result.stderr and not (folder / "PWNED").exists()


def test_lost_samples_are_reported_on_stderr_by_the_command_line(pristine, tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(pristine / "digits", folder)
    lost = garbage_bytes(folder)
    result = _run([str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
                   f"data.shards={folder}", "data.builtin=", f"run.dir={tmp_path / 'run'}",
                   "logging.wandb=disabled", "logging.progress=false", "data.batch_size=16",
                   "model.latent_dim=4", "objective.K=2", "train.epochs=1", "train.test_batches=0"],
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{SHARD}: {lost} of its 5 samples could not be read" in result.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data_errors"] == lost


def test_a_worker_s_data_error_arrives_as_one_line(pristine, tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(pristine / "digits", folder)
    lost = garbage_bytes(folder)
    loader = make_loader(folder, "test", batch_size=2, modalities=["mnist"], shuffle=False,
                         drop_last=False, num_workers=2)
    assert sum(len(b["mnist"]) for b in loader) == 10 - lost and loader.errors == lost
    with pytest.raises(ShardDataError) as err:
        list(make_loader(folder, "test", batch_size=2, modalities=["mnist"], shuffle=False,
                         drop_last=False, num_workers=2, on_error="raise"))
    assert str(err.value).startswith(f"shard {folder / SHARD}: {lost} of its 5") and "\n" not in str(err.value)


@pytest.mark.parametrize("particle_shards", [1, 2])
def test_two_processes_count_each_lost_sample_once(pristine, tmp_path, particle_shards):
    """data_errors sums over data-parallel groups: two groups split the damaged test split
    (P=1), or the two ranks of one group both read it (P=2) and it counts once."""
    folder = tmp_path / "digits"
    shutil.copytree(pristine / "digits", folder)
    lost = garbage_bytes(folder)
    run_dir = tmp_path / "run"
    result = _run(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0", str(ROOT / "launch" / "train.py"),
                   "--config", str(ROOT / "configs" / "demo.yaml"), f"data.shards={folder}",
                   "data.builtin=", f"run.dir={run_dir}", "logging.wandb=disabled",
                   "logging.progress=false", "data.batch_size=4", "model.latent_dim=4",
                   "objective.K=2", "train.epochs=1", "train.test_batches=0",
                   f"parallel.particle_shards={particle_shards}"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    test = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["split"] == "test"]
    assert test[-1]["data_errors"] == lost
    assert json.loads((run_dir / "summary.json").read_text())["data_errors"] == lost


def test_lost_samples_are_carried_through_a_resume(pristine, tmp_path, capsys):
    """data_errors lives in the checkpointed TrainState: one epoch, then --resume auto for a
    second, counts what two uninterrupted epochs count (the damaged test shard, read twice)."""
    folder = tmp_path / "digits"
    shutil.copytree(pristine / "digits", folder)
    lost = garbage_bytes(folder)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(folder, straight, "skip", capsys, "train.epochs=2")[0] == 0
    assert _train(folder, split, "skip", capsys)[0] == 0
    train_main = _entry_point("train")
    assert train_main(["--config", str(ROOT / "configs" / "demo.yaml"), "--resume", "auto",
                       f"data.shards={folder}", "data.builtin=", f"run.dir={split}",
                       "logging.wandb=disabled", "logging.progress=false", "data.batch_size=16",
                       "model.latent_dim=4", "objective.K=2", "train.epochs=2",
                       "train.test_batches=0", "data.num_workers=0", "data.on_error=skip"]) == 0
    summaries = [json.loads((run / "summary.json").read_text()) for run in (straight, split)]
    assert summaries[0]["data_errors"] == summaries[1]["data_errors"] == 2 * lost
