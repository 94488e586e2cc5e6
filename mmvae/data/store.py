"""Where shards live: a local folder or an ``http(s)://`` prefix (``data.shards``).

A store opens *names* from the manifest, never paths or URLs taken from it: every name is
checked to be a plain file name (no scheme, no ``/``, no ``..``) before it is joined to the
folder or appended to the prefix, and shards are opened here, not by webdataset's opener
(which would run a ``pipe:`` name as a shell command). Remote reads use the standard library
(``urllib``): any static HTTPS server or object store that serves the folder's files under one
prefix works (a public bucket URL; a prefix with a container-wide token in its query string,
such as an Azure SAS; see docs/data.md, Remote shards).
"""
from __future__ import annotations

import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mmvae.data.errors import ShardsError, ShardsNotFound, one_line

PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
REMOTE_SCHEMES = ("http://", "https://")
TIMEOUT_S = 60.0


def plain_name(name) -> bool:
    """A file name inside the folder: letters, digits, ``_.-``, not starting with a dot (so no
    ``..``, no hidden file), no ``/``, no ``:`` (so no ``pipe:`` or URL scheme)."""
    return isinstance(name, str) and PLAIN_NAME.fullmatch(name) is not None


def _require_plain(name: str) -> str:
    if not plain_name(name):  # the manifest check refuses these first; this is the backstop
        raise ShardsError(f"refusing to open {name!r}: not a plain file name inside the shards folder")
    return name


class LocalStore:
    """Shards in a local folder."""

    remote = False

    def __init__(self, root):
        self.root = Path(root)
        self.location = str(root)

    def check(self) -> None:
        """The folder exists and can be listed and read."""
        if not self.root.exists():
            raise ShardsNotFound(f"no shards folder {self.location}: build the shards there or set "
                                 f"data.shards to the folder that holds manifest.json")
        if not self.root.is_dir():
            raise ShardsError(f"data.shards={self.location} is not a folder; set it to the folder "
                              f"that holds manifest.json")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise ShardsError(f"shards folder {self.location} is not readable; fix its permissions")

    def describe(self, name: str) -> str:
        return str(self.root / name)

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        path = self.root / _require_plain(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        """Size in bytes, or None when the file is missing (or not a regular file)."""
        path = self.root / _require_plain(name)
        return path.stat().st_size if path.is_file() else None

    def open(self, name: str):
        return open(self.root / _require_plain(name), "rb")

    @staticmethod
    def stream_size(stream) -> int | None:
        return os.fstat(stream.fileno()).st_size


class HttpStore:
    """Shards under an ``http(s)://`` prefix: ``prefix + name`` for each listed name. A query
    string on the prefix (a container-wide access token such as an Azure SAS) is kept after
    each name, and left out of every message and log line."""

    remote = True

    def __init__(self, prefix: str, timeout: float = TIMEOUT_S):
        base, _, query = prefix.partition("?")
        self.base = base if base.endswith("/") else base + "/"
        self.query = f"?{query}" if query else ""
        self.location, self.timeout = base, timeout

    def url(self, name: str) -> str:
        return self.base + urllib.parse.quote(_require_plain(name)) + self.query

    def describe(self, name: str) -> str:
        return self.base + name

    def check(self) -> None:
        """Nothing to check before the manifest is fetched."""

    def _request(self, name: str, method: str = "GET"):
        request = urllib.request.Request(self.url(name), method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise OSError(f"{self.describe(name)}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, TimeoutError) as err:
            raise OSError(f"{self.describe(name)}: {one_line(getattr(err, 'reason', err))}") from None

    def read_bytes(self, name: str) -> bytes | None:
        response = self._request(name)
        if response is None:
            return None
        with response:
            return response.read()

    def size(self, name: str) -> int | None:
        response = self._request(name, "HEAD")
        if response is None:
            return None
        with response:
            return self.stream_size(response)

    def open(self, name: str):
        response = self._request(name)
        if response is None:
            raise FileNotFoundError(f"{self.describe(name)}: HTTP 404 Not Found")
        return response

    @staticmethod
    def stream_size(stream) -> int | None:
        length = stream.headers.get("Content-Length")
        return int(length) if length is not None and length.isdigit() else None


def open_store(location) -> LocalStore | HttpStore:
    """The store for ``data.shards``: an ``http(s)://`` prefix or a local folder."""
    text = str(location)
    if text.startswith(REMOTE_SCHEMES):
        return HttpStore(text)
    return LocalStore(location)
