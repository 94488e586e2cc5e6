"""Safe extraction: good zip and tar.gz archives come out byte for byte; each refused kind of
member is a one-line error naming it, and a refused archive writes nothing."""
from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from mmvae.data.extract import ExtractError, extract

FILES = {"top/a.txt": b"alpha\n", "top/sub/b.bin": bytes(range(256)) * 10, "c.txt": b""}


def make_zip(path: Path, members: dict, symlinks: dict = (), stored: bool = False) -> Path:
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in dict(symlinks).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def make_tar(path: Path, members: dict, extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def tar_info(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("maker", [make_zip, make_tar])
def test_good_archives_come_out_byte_for_byte(tmp_path, maker):
    archive = maker(tmp_path / "a.arc", FILES)
    extract(archive, tmp_path / "out")
    assert tree(tmp_path / "out") == FILES


def test_links_inside_the_target_are_recreated(tmp_path):
    extra = [tar_info("top/link", tarfile.SYMTYPE, "sub/b.bin"),
             tar_info("top/hard", tarfile.LNKTYPE, "top/a.txt")]
    extract(make_tar(tmp_path / "a.tgz", FILES, extra), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "top/link").is_symlink() and (out / "top/link").read_bytes() == FILES["top/sub/b.bin"]
    assert (out / "top/hard").read_bytes() == FILES["top/a.txt"] and not (out / "top/hard").is_symlink()


REFUSED = {
    "zip absolute": (lambda p: make_zip(p, {**FILES, "/etc/evil": b"x"}), "/etc/evil", "absolute path"),
    "zip dotdot": (lambda p: make_zip(p, {**FILES, "top/../../evil": b"x"}), "top/../../evil", "'..'"),
    "zip backslash dotdot": (lambda p: make_zip(p, {"..\\evil": b"x"}), "..\\evil", "'..'"),
    "zip drive letter": (lambda p: make_zip(p, {"C:/evil": b"x"}), "C:/evil", "absolute path"),
    "zip symlink out": (lambda p: make_zip(p, FILES, {"top/l": "../../etc/passwd"}), "top/l",
                        "symbolic link to '../../etc/passwd'"),
    "zip big member": (lambda p: make_zip(p, {**FILES, "big": b"0" * 5000}), "big", "over the limit"),
    "tar absolute": (lambda p: make_tar(p, {"/tmp/evil": b"x"}), "/tmp/evil", "absolute path"),
    "tar dotdot": (lambda p: make_tar(p, {"a/../../evil": b"x"}), "a/../../evil", "'..'"),
    "tar symlink out": (lambda p: make_tar(p, FILES, [tar_info("top/l", tarfile.SYMTYPE, "/etc/passwd")]),
                        "top/l", "symbolic link to '/etc/passwd'"),
    "tar symlink up": (lambda p: make_tar(p, FILES, [tar_info("top/l", tarfile.SYMTYPE, "../../x")]),
                       "top/l", "outside the target"),
    "tar hardlink out": (lambda p: make_tar(p, FILES, [tar_info("top/h", tarfile.LNKTYPE, "../secret")]),
                         "top/h", "hard link to '../secret'"),
    "tar char device": (lambda p: make_tar(p, FILES, [tar_info("dev/null", tarfile.CHRTYPE)]),
                        "dev/null", "device file"),
    "tar block device": (lambda p: make_tar(p, FILES, [tar_info("dev/sda", tarfile.BLKTYPE)]),
                         "dev/sda", "device file"),
    "tar fifo": (lambda p: make_tar(p, FILES, [tar_info("pipe", tarfile.FIFOTYPE)]), "pipe", "FIFO"),
    "tar big member": (lambda p: make_tar(p, {**FILES, "big": b"0" * 5000}), "big", "over the limit"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_each_refused_member_is_one_line_naming_it_and_nothing_is_written(tmp_path, case):
    maker, member, reason = REFUSED[case]
    archive = maker(tmp_path / "a.arc")
    out = tmp_path / "out"
    with pytest.raises(ExtractError) as err:
        extract(archive, out, max_member_bytes=4096)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert f"refusing member {member!r}" in message
    assert reason in message and str(archive) in message
    assert list(out.iterdir()) == []  # checked before anything was written
    assert not (tmp_path / "evil").exists()


def test_a_corrupt_member_fails_its_crc_check(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"a.txt": b"hello world " * 10}, stored=True)
    raw = bytearray(archive.read_bytes())
    at = raw.find(b"hello world")
    raw[at] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(ExtractError, match="CRC"):
        extract(archive, tmp_path / "out")


def test_something_that_is_not_an_archive_is_named(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"<html>not found</html>")
    with pytest.raises(ExtractError, match="neither a zip nor a tar"):
        extract(tmp_path / "x.zip", tmp_path / "out")
