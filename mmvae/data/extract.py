"""Safe extraction of downloaded archives (zip, tar, tar.gz), member by member.

Every member is checked before anything is written, so a refused archive leaves the target
untouched. Refused, each with a one-line `ExtractError` naming the archive and the member:

* absolute names (``/etc/x``, ``C:/x``, ``\\\\server\\x``) and names with a ``..`` part;
* symbolic and hard links whose target lies outside the target folder;
* device files, FIFOs and anything else that is not a file, a folder or a link;
* members bigger than ``max_member_bytes`` (stated by the archive, and counted while
  copying, so a member that inflates past its stated size is stopped too).

No ``extractall``: files are copied from the archive's stream into the target, folders are
made, links inside the target are recreated (hard links as copies). zip members are read
through `zipfile`, which checks each member's CRC-32.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mmvae.data.recipes.common import InputError

MAX_MEMBER_BYTES = 4 << 30
"""Default per-member limit (4 GiB): the largest published member we extract is far smaller."""
_COPY_CHUNK = 1 << 20


class ExtractError(InputError):
    """An archive member that is refused, or an unreadable archive (one line)."""


@dataclass(frozen=True)
class _Member:
    name: str          # as in the archive
    kind: str          # "file" | "dir" | "symlink" | "hardlink"
    size: int
    link: str = ""     # link target (symlink: relative to the member's folder; hardlink: root)
    handle: object = None


def _parts(name: str) -> list[str]:
    return [p for p in re.split(r"[\\/]", name) if p not in ("", ".")]


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name))


def _inside(root: Path, relative: str) -> bool:
    """Whether `relative` (a posix path below `root`) stays inside `root`, lexically."""
    joined = os.path.normpath(os.path.join(str(root), relative))
    return joined == str(root) or joined.startswith(str(root) + os.sep)


def check_member(archive, member: _Member, root: Path, max_member_bytes: int) -> None:
    """Raise ExtractError if `member` may not be extracted into `root` (module docstring)."""
    def refuse(reason):
        raise ExtractError(f"{archive}: refusing member {member.name!r}: {reason}; "
                           f"the archive is unsafe or corrupt, download it again from its source")

    if _is_absolute(member.name):
        refuse("absolute path")
    if ".." in _parts(member.name):
        refuse("'..' in its path")
    if not _parts(member.name):
        refuse("empty name")
    if member.kind not in ("file", "dir", "symlink", "hardlink"):
        refuse(f"{member.kind} (only files, folders and links inside the target are extracted)")
    if member.size > max_member_bytes:
        refuse(f"{member.size:,} bytes, over the limit of {max_member_bytes:,}")
    if member.kind == "symlink":
        parent = "/".join(_parts(member.name)[:-1])
        if _is_absolute(member.link) or not _inside(root, os.path.join(parent, member.link)):
            refuse(f"symbolic link to {member.link!r}, outside the target folder")
    if member.kind == "hardlink":
        if _is_absolute(member.link) or not _inside(root, member.link):
            refuse(f"hard link to {member.link!r}, outside the target folder")


# --- reading member lists ---------------------------------------------------------------------

def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr() or info.isblk():
        return "device file"
    if info.isfifo():
        return "FIFO"
    return "special member"


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16  # unix mode, when the zip was made on unix
    if stat.S_ISLNK(mode):
        return "symlink"
    if info.is_dir():
        return "dir"
    if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
        return "device file"
    if mode and stat.S_ISFIFO(mode):
        return "FIFO"
    return "file"


def _tar_members(tar: tarfile.TarFile) -> list[_Member]:
    return [_Member(i.name, _tar_kind(i), i.size, i.linkname, i) for i in tar.getmembers()]


def _zip_members(zf: zipfile.ZipFile) -> list[_Member]:
    out = []
    for info in zf.infolist():
        kind = _zip_kind(info)
        link = zf.read(info).decode("utf-8", "replace") if kind == "symlink" else ""
        out.append(_Member(info.filename, kind, info.file_size, link, info))
    return out


# --- writing ----------------------------------------------------------------------------------

def _target(root: Path, member: _Member) -> Path:
    path = root.joinpath(*_parts(member.name))
    # Defence in depth against links made by earlier members: the real folder must be inside.
    real_parent = path.parent.resolve()
    if real_parent != root and root not in real_parent.parents:
        raise ExtractError(f"refusing member {member.name!r}: its folder resolves outside "
                           f"{root} through a link")
    return path


def _copy(src, path: Path, member: _Member, limit: int) -> None:
    written = 0
    with open(path, "wb") as out:
        while block := src.read(_COPY_CHUNK):
            written += len(block)
            if written > limit:
                raise ExtractError(f"refusing member {member.name!r}: inflates past the limit "
                                   f"of {limit:,} bytes")
            out.write(block)


def _write(opener, root: Path, member: _Member, limit: int) -> Path:
    path = _target(root, member)
    if member.kind == "dir":
        path.mkdir(parents=True, exist_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink():
            raise ExtractError(f"refusing member {member.name!r}: a folder of that name exists")
        path.unlink()
    if member.kind == "symlink":
        os.symlink(member.link, path)
    elif member.kind == "hardlink":
        shutil.copyfile(_target(root, _Member(member.link, "file", 0)), path)
    else:
        with opener(member) as src:
            _copy(src, path, member, limit)
    return path


def extract(archive, dest, *, max_member_bytes: int = MAX_MEMBER_BYTES) -> list[Path]:
    """Extract a zip or tar(.gz/.bz2/.xz) `archive` into `dest` safely; returns the paths
    written. Raises ExtractError (one line) before writing anything if any member is refused."""
    archive, root = Path(archive), Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return _extract_all(archive, _zip_members(zf), root, max_member_bytes,
                                    lambda m: zf.open(m.handle))
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tar:
                return _extract_all(archive, _tar_members(tar), root, max_member_bytes,
                                    lambda m: tar.extractfile(m.handle))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        if isinstance(err, ExtractError):
            raise
        raise ExtractError(f"{archive}: cannot read the archive ({type(err).__name__}: {err}); "
                           f"download it again") from None
    raise ExtractError(f"{archive} is neither a zip nor a tar archive; download it again")


def _extract_all(archive, members, root, limit, opener) -> list[Path]:
    for member in members:  # every check first: a refused archive writes nothing
        check_member(archive, member, root, limit)
    try:
        return [_write(opener, root, m, limit) for m in members]
    except ExtractError as err:
        raise ExtractError(f"{archive}: {err}") from None
