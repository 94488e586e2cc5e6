"""Verified downloads against a real HTTP server on 127.0.0.1 (no network needed): good,
resumed, restarted, wrong checksum, server error, unreachable, mirrors; and the shard launchers'
--download on fixture files in the published formats."""
from __future__ import annotations

import hashlib
import importlib
import io
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmvae.data import download
from mmvae.data.download import DownloadError, Resource, fetch

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes: several reads of the client


class _Handler(BaseHTTPRequestHandler):
    """Routes: /files/NAME (honours Range), /norange/NAME (ignores it), /cut/NAME (sends half,
    then closes the connection), /error/NAME (HTTP 500)."""

    timeout = 10  # a stuck client cannot hold a server thread for long

    def do_GET(self):  # noqa: N802 - http.server's name
        server = self.server
        route, _, name = self.path.lstrip("/").partition("/")
        server.requests.append((route, name, self.headers.get("Range")))
        data = server.files.get(name)
        if route == "error":
            return self.send_error(500, "fixture failure")
        if data is None:
            return self.send_error(404)
        start = 0
        ranged = self.headers.get("Range")
        if ranged and route != "norange":
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self.send_error(416)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if route == "cut":
            body = body[:len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)
        server.sent.append(len(body))

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.requests, httpd.sent = {}, [], []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT_S", 5)
    monkeypatch.delenv(download.BASE_ENV, raising=False)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def resource(server, route="files", data=PAYLOAD, digest=None, size=None, name="blob.bin"):
    server.files[name] = data
    return Resource(name, (f"{server.url}/{route}/{name}",),
                    digest if digest is not None else f"md5:{md5(data)}", size)


def test_good_download_is_verified_and_not_fetched_again(server, tmp_path):
    res = resource(server, size=len(PAYLOAD))
    path = fetch(res, tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "blob.bin.part").exists()
    fetch(res, tmp_path, progress=False)
    assert len(server.requests) == 1  # the verified file was kept, nothing re-downloaded


def test_broken_transfer_keeps_the_partial_file_and_the_next_run_resumes_it(server, tmp_path):
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(resource(server, route="cut"), tmp_path, progress=False)
    part = tmp_path / "blob.bin.part"
    half = part.stat().st_size
    assert 0 < half < len(PAYLOAD) and part.read_bytes() == PAYLOAD[:half]
    fetch(resource(server), tmp_path, progress=False)
    assert server.requests[-1] == ("files", "blob.bin", f"bytes={half}-")
    assert server.sent[-1] == len(PAYLOAD) - half  # only the rest went over the wire
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD and not part.exists()


def test_a_server_that_ignores_range_is_downloaded_again_from_byte_zero(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(b"stale bytes of another attempt")
    fetch(resource(server, route="norange"), tmp_path, progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD


def test_wrong_checksum_deletes_the_partial_file_and_names_url_and_both_digests(server, tmp_path):
    wrong = md5(b"something else")
    res = resource(server, digest=f"md5:{wrong}")
    with pytest.raises(DownloadError) as err:
        fetch(res, tmp_path, progress=False)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert res.urls[0] in message and wrong in message and md5(PAYLOAD) in message
    assert list(tmp_path.iterdir()) == []  # neither a final nor a partial file


def test_wrong_size_is_refused_before_the_checksum(server, tmp_path):
    with pytest.raises(DownloadError, match=f"{len(PAYLOAD):,} bytes, expected 7"):
        fetch(resource(server, size=7), tmp_path, progress=False)


def test_server_error_is_one_line_naming_the_url_and_how_to_place_the_file(server, tmp_path):
    res = resource(server, route="error", size=len(PAYLOAD))
    with pytest.raises(DownloadError) as err:
        fetch(res, tmp_path, progress=False)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "HTTP 500" in message and res.urls[0] in message
    assert f"copy it to {tmp_path / 'blob.bin'}" in message and f"{len(PAYLOAD):,} bytes" in message


def test_no_network_is_one_line_naming_the_url(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = Resource("x.bin", (f"http://127.0.0.1:{port}/x.bin",), "md5:" + "0" * 32)
    with pytest.raises(DownloadError) as err:
        fetch(res, tmp_path, progress=False)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert f"cannot reach http://127.0.0.1:{port}/x.bin" in message and "no network?" in message


def test_mirrors_are_tried_in_order(server, tmp_path):
    server.files["blob.bin"] = PAYLOAD
    res = Resource("blob.bin", (f"{server.url}/error/blob.bin", f"{server.url}/files/blob.bin"),
                   f"md5:{md5(PAYLOAD)}")
    assert fetch(res, tmp_path, progress=False).read_bytes() == PAYLOAD
    assert [r[0] for r in server.requests] == ["error", "files"]


def test_base_url_from_the_environment_replaces_every_url(server, tmp_path, monkeypatch):
    server.files["blob.bin"] = PAYLOAD
    monkeypatch.setenv(download.BASE_ENV, f"{server.url}/files/")
    res = Resource("blob.bin", ("http://unreachable.invalid/blob.bin",), f"md5:{md5(PAYLOAD)}")
    assert fetch(res, tmp_path, progress=False).read_bytes() == PAYLOAD


def test_unpinned_file_records_its_sha256_and_later_runs_check_it(server, tmp_path):
    server.files["blob.bin"] = PAYLOAD
    res = Resource("blob.bin", (f"{server.url}/files/blob.bin",))  # no digest published
    path = fetch(res, tmp_path, progress=False)
    recorded = (tmp_path / "blob.bin.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(PAYLOAD).hexdigest()
    path.write_bytes(PAYLOAD[:-1] + b"\x00")  # changed after the first download
    with pytest.raises(DownloadError, match="delete it to download it again"):
        fetch(res, tmp_path, progress=False)
    assert path.exists()  # a file that was there is never deleted


def test_sha256_prefix_digest_as_torchvision_weight_names_carry(server, tmp_path):
    prefix = hashlib.sha256(PAYLOAD).hexdigest()[:8]
    assert fetch(resource(server, digest=f"sha256:{prefix}"), tmp_path, progress=False).is_file()


# --- the launchers --------------------------------------------------------------------------

def _launcher(name):
    return importlib.import_module(f"mmvae.cli.{name}").main


def test_shard_mnist_svhn_download_fetches_checks_and_shards(server, tmp_path, monkeypatch, capsys):
    """torchvision's MNIST/SVHN class attributes name the files and MD5s: here they name the
    fixture files (published formats, made by the recipe tests) served by the local server."""
    import torchvision.datasets as tvd
    from test_mnist_svhn import make_raw

    from mmvae.data import sources

    raw = tmp_path / "raw"
    make_raw(raw)  # gzipped idx + .mat files
    files = {p.name: p.read_bytes() for p in [*(raw / "mnist").iterdir(), *(raw / "svhn").iterdir()]}
    server.files.update(files)
    monkeypatch.setattr(tvd.MNIST, "resources", [(n, md5(d)) for n, d in files.items() if "ubyte" in n])
    monkeypatch.setattr(tvd.SVHN, "split_list", {s: [f"http://x.invalid/{s}_32x32.mat", f"{s}_32x32.mat",
                                                     md5(files[f"{s}_32x32.mat"])] for s in ("train", "test")})
    monkeypatch.setattr(sources, "MNIST_SIZES", {n: len(d) for n, d in files.items()})
    monkeypatch.setattr(sources, "SVHN_SIZES", {})
    monkeypatch.setenv(download.BASE_ENV, f"{server.url}/files")
    main = _launcher("shard_mnist_svhn")
    out = tmp_path / "shards"
    argv = ["--download", str(tmp_path / "data"), "--out", str(out), "--pairs-per-instance", "2",
            "--max-per-class", "3", "--min-shards", "2"]
    assert main(argv) == 0
    assert (out / "manifest.json").is_file()
    assert (tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes() == files["t10k-labels-idx1-ubyte.gz"]
    requests = len(server.requests)
    assert main(argv) == 0 and len(server.requests) == requests  # verified files are reused
    monkeypatch.setattr(tvd.SVHN, "split_list", {s: ["", f"{s}_32x32.mat", "0" * 32] for s in ("train", "test")})
    capsys.readouterr()
    assert main(argv) == 2  # a file in place with the wrong checksum: one line, exit 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "md5 mismatch for train_32x32.mat" in err


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_shard_cub_download_extracts_safely_and_shards(server, tmp_path, monkeypatch, capsys):
    from test_cub import make_cub

    cub = make_cub(tmp_path / "src" / "cub")
    members = {f"cub/{p.relative_to(cub).as_posix()}": p.read_bytes()
               for p in sorted(cub.rglob("*")) if p.is_file()}
    server.files["cub.zip"] = _zip(members)
    monkeypatch.setenv(download.BASE_ENV, f"{server.url}/files")
    main = _launcher("shard_cub")
    data, out = tmp_path / "data", tmp_path / "shards"
    assert main(["--download", str(data), "--out", str(out), "--min-shards", "2", "--workers", "0"]) == 0
    assert (out / "manifest.json").is_file() and (out / "vocab.json").is_file()
    assert (data / "cub" / "text_testclasses.txt").read_bytes() == (cub / "text_testclasses.txt").read_bytes()
    assert (data / "cub.zip.sha256").is_file()  # no published checksum: recorded on first use

    server.files["cub.zip"] = _zip({**members, "cub/../../evil.txt": b"x"})
    capsys.readouterr()
    assert main(["--download", str(tmp_path / "data2"), "--out", str(tmp_path / "s2")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "'cub/../../evil.txt'" in errors[0]  # after the progress bar
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data2" / "cub").exists()


def test_shard_launchers_without_network_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(download.BASE_ENV, f"http://127.0.0.1:{port}")
    assert _launcher("shard_cub")(["--download", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"cannot reach http://127.0.0.1:{port}/cub.zip" in err and "copy it to" in err


def test_import_paper_model_download_fetches_and_imports_a_released_zip(server, tmp_path, monkeypatch):
    """A paper-format zip (written by --export of a tiny model of ours) served as the released
    mnist-svhn.zip; --download fetches it, records its sha256, and imports it."""
    import torch

    import mmvae
    from mmvae.config import load_config, save_config
    from mmvae.interop import export_paper_model

    run = tmp_path / "ours"
    run.mkdir()
    save_config(load_config(None, ["model.latent_dim=3"]), run / "config.yaml")
    torch.manual_seed(0)
    model = mmvae.build_model("mnist_svhn", latent_dim=3)
    mmvae.save_model(model, run / "model")
    folder = export_paper_model(run, tmp_path / "paper")
    server.files["mnist-svhn.zip"] = _zip({f"mnist-svhn/{f.name}": f.read_bytes() for f in folder.iterdir()})
    monkeypatch.setenv(download.BASE_ENV, f"{server.url}/files")
    out = tmp_path / "imported"
    main = _launcher("import_paper_model")
    assert main(["mnist-svhn", "--download", str(tmp_path / "pre"), "--out", str(out)]) == 0
    assert (tmp_path / "pre" / "mnist-svhn.zip.sha256").is_file()
    imported = mmvae.load_model(out).state_dict()
    assert all(torch.equal(v, imported[k]) for k, v in model.state_dict().items())
    assert main(["nope", "--download", str(tmp_path / "pre"), "--out", str(tmp_path / "x")]) == 2
