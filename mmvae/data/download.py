"""Verified downloads: resume with HTTP Range, check size and checksum, one-line errors.

``fetch(resource, folder)`` leaves ``folder/<resource.filename>`` only once its size and digest
are right. While it downloads, the bytes go to ``<filename>.part``; a broken connection keeps
that file and the next call asks the server for the rest (``Range: bytes=N-``). A digest that
does not match deletes the partial file and raises one line naming the URL and both digests.
A file already in place (downloaded earlier, or put there by hand) is checked, never replaced.

Checksums are pinned in the code that defines the resources (`mmvae.data.sources`): MD5s that
torchvision's dataset classes publish, the sha256 prefix that torchvision puts in its weight
file names. For files whose publishers give no checksum, the sha256 of the first complete
download is written next to the file (``<filename>.sha256``) and every later run checks it.

``MMVAE_DOWNLOAD_BASE`` (or ``base_url=``) replaces every URL by ``<base>/<filename>``: a
mirror, or the local test server.

Errors are `DownloadError` (an `InputError`: the launchers print it and exit with code 2).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mmvae.data.recipes.common import InputError

BASE_ENV = "MMVAE_DOWNLOAD_BASE"
CHUNK = 1 << 20
TIMEOUT_S = 60
USER_AGENT = "mmvae-download/1"


class DownloadError(InputError):
    """A download that could not be completed or verified (one line, names the URL)."""


@dataclass(frozen=True)
class Resource:
    """One published file: where it lives and what it must be.

    ``urls`` are tried in order (mirrors). ``digest`` is ``"<algo>:<hex>"`` (md5 or sha256); a
    hex shorter than the full digest is a prefix (torchvision's weight file names carry the
    first 8 hex digits of their sha256). ``size`` in bytes when the publisher states it."""

    filename: str
    urls: tuple[str, ...]
    digest: str | None = None
    size: int | None = None
    note: str = ""

    def __post_init__(self):
        if "/" in self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"resource file name {self.filename!r} must be a plain name")
        if self.digest is not None and self.digest.split(":")[0] not in ("md5", "sha256"):
            raise ValueError(f"digest {self.digest!r}: use md5:<hex> or sha256:<hex>")

    def how_to_place(self, folder) -> str:
        facts = ", ".join(f for f in (f"{self.size:,} bytes" if self.size else "",
                                      self.digest or "") if f)
        return (f"download {self.urls[0]} on a machine with internet and copy it to "
                f"{Path(folder) / self.filename}" + (f" ({facts})" if facts else ""))


def file_digest(path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _expected(resource: Resource, path: Path) -> tuple[str, str] | None:
    """(algo, hex) to check `path` against: the pinned digest, else the recorded sha256."""
    if resource.digest:
        algo, hexdigest = resource.digest.split(":", 1)
        return algo, hexdigest.lower()
    recorded = path.with_name(path.name + ".sha256")
    if recorded.is_file():
        return "sha256", recorded.read_text().split()[0].lower()
    return None


def verify(resource: Resource, path: Path, url: str) -> str | None:
    """Raise DownloadError unless `path` has the pinned size and digest; returns the digest
    checked (None when nothing is known to check it against)."""
    size = path.stat().st_size
    if resource.size is not None and size != resource.size:
        raise DownloadError(f"{url}: {path} has {size:,} bytes, expected {resource.size:,}")
    expected = _expected(resource, path)
    if expected is None:
        return None
    algo, want = expected
    got = file_digest(path, algo)
    if not got.startswith(want):
        raise DownloadError(f"{url}: {algo} mismatch for {path.name}: expected {want}, got {got}")
    return got


def _urls(resource: Resource, base_url: str | None) -> tuple[str, ...]:
    base = base_url if base_url is not None else os.environ.get(BASE_ENV)
    if base:
        return (f"{base.rstrip('/')}/{resource.filename}",)
    return resource.urls


def fetch(resource: Resource, folder, *, base_url: str | None = None,
          progress: bool = True) -> Path:
    """``folder/<filename>``, downloaded (or resumed) and verified (module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / resource.filename
    urls = _urls(resource, base_url)
    if final.is_file():
        try:
            verify(resource, final, urls[0])
        except DownloadError as err:
            raise DownloadError(f"{err}; it was there before this run: delete it to download "
                                f"it again") from None
        return final
    errors = []
    for url in urls:
        try:
            _download(url, resource, folder, progress)
            break
        except _Unreachable as err:  # try the next mirror; the partial file stays for resuming
            errors.append(str(err))
    else:
        raise DownloadError(f"{'; '.join(errors)}; no network? {resource.how_to_place(folder)}, "
                            f"then run again")
    return final


class _Unreachable(Exception):
    """The server could not be reached or answered with an error (one line)."""


def _download(url: str, resource: Resource, folder: Path, progress: bool) -> None:
    part = folder / (resource.filename + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - http(s) only
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the partial file may be whole
            return _finish(url, resource, part, folder)
        raise _Unreachable(f"{url} answered HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise _Unreachable(f"cannot reach {url} ({reason})") from None
    with response:
        if offset and response.status != 206:  # the server ignored Range: start over
            offset = 0
        elif offset and not _range_starts_at(response, offset):
            raise _Unreachable(f"{url} answered a range that does not start at byte {offset}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else resource.size
        _stream(url, response, part, offset, total, resource.filename, progress)
    if total is not None and part.stat().st_size != total:
        raise _Unreachable(f"{url}: connection closed at {part.stat().st_size:,} of "
                           f"{total:,} bytes (kept {part.name}: run again to resume)")
    _finish(url, resource, part, folder)


def _range_starts_at(response, offset: int) -> bool:
    content_range = response.headers.get("Content-Range", "")  # "bytes 100-199/200"
    try:
        return int(content_range.split()[1].split("-")[0]) == offset
    except (IndexError, ValueError):
        return False


def _stream(url, response, part: Path, offset: int, total, name: str, progress: bool) -> None:
    with open(part, "ab" if offset else "wb") as out, _bar(progress) as bar:
        task = bar.add_task(f"downloading {name}", total=total, completed=offset)
        while True:
            try:
                block = response.read(CHUNK)
            except (OSError, socket.timeout, http.client.HTTPException) as err:
                raise _Unreachable(f"{url}: transfer broke after {out.tell():,} bytes ({err}; "
                                   f"kept {part.name}: run again to resume)") from None
            if not block:
                break
            out.write(block)
            bar.advance(task, len(block))


def _finish(url: str, resource: Resource, part: Path, folder: Path) -> None:
    """Verify the complete partial file, then rename it into place (never a bad final file)."""
    try:
        got = verify(resource, part, url)
    except DownloadError:
        part.unlink(missing_ok=True)  # a bad partial file would be resumed forever
        raise
    final = folder / resource.filename
    os.replace(part, final)
    if got is None:  # nothing published to check against: record what we got (trust on first use)
        got = file_digest(final, "sha256")
        final.with_name(final.name + ".sha256").write_text(f"{got}  {final.name}\n")
        from mmvae.log import console

        console.print(f"note: {url} publishes no checksum; sha256 {got} recorded in "
                      f"{final.name}.sha256 and checked from now on")


def _bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)
