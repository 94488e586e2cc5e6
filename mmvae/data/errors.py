"""The data layer's errors: bad input (one line, exit 2), bad data met while streaming, and
the pipeline's one handler of it (`ErrorCounter`: skip and count, or raise one line)."""
from __future__ import annotations

import logging
from collections import Counter

from mmvae.config import ConfigError

# The streaming pipeline's warnings keep the logger they always had (a filter set on it works).
log = logging.getLogger("mmvae.data.pipeline")


class ShardsError(ConfigError):
    """The shards folder cannot be used as given (bad or missing manifest, a listed shard
    missing, an entry that is not a plain shard name, an empty split, an unreadable folder).
    A ConfigError: entry points print its one line and exit 2 before writing anything."""


class ShardsNotFound(ShardsError, FileNotFoundError):
    """No manifest (not built, or an interrupted build) or a listed file is missing."""


class ShardDataError(RuntimeError):
    """Bad data met while streaming under ``data.on_error=raise`` (the message names the
    shard, and the sample when there is one), or too little good data left to go on."""


def one_line(text: str) -> str:
    """Messages become single lines (an exception text may hold newlines)."""
    return " ".join(str(text).split())


def describe(exn: BaseException) -> str:
    """'Type: message' of an exception, without the ' @ <stream ...>' webdataset appends."""
    message = str(exn.args[0]) if getattr(exn, "args", None) else str(exn)
    return one_line(f"{type(exn).__name__}: {message.split(' @ <')[0]}")


class ErrorCounter:
    """The one error handler of the pipeline. Under ``"skip"`` it counts every sample not
    delivered and logs a warning naming the shard (per sample: the first few of each shard,
    with key and reason; per shard: how many samples it lost); under ``"raise"`` the first
    problem raises a one-line :class:`ShardDataError`."""

    SHOWN_PER_SHARD = 3

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.count = 0
        self._taken = 0
        self._shown: Counter = Counter()
        self._noted: set = set()

    def _fail(self, message: str, exn: BaseException | None = None):
        raise ShardDataError(one_line(message)) from exn

    def sample(self, shard: str, key: str | None, what: str, exn: BaseException | None = None) -> None:
        """One sample dropped (missing key, undecodable, breaks the spec)."""
        where = f"shard {shard}, sample {key}"
        if self.on_error == "raise":
            self._fail(f"bad data in {where}: {what} (data.on_error=raise)", exn)
        self.count += 1
        self._shown[shard] += 1
        if self._shown[shard] <= self.SHOWN_PER_SHARD:
            log.warning("skipping bad data in %s: %s", where, one_line(what))
        elif self._shown[shard] == self.SHOWN_PER_SHARD + 1:
            log.warning("more bad samples in shard %s: not shown, each is counted", shard)

    def lost(self, shard: str, lost: int, expected: int, why: str) -> None:
        """``lost`` samples of a shard never came out of its tar."""
        message = f"shard {shard}: {lost} of its {expected} samples could not be read ({why})"
        if self.on_error == "raise":
            self._fail(f"{message} (data.on_error=raise)")
        self.count += lost
        self.note(shard, f"{message}; counted as data errors")

    def tar_error(self, shard: str, exn: BaseException) -> str:
        """An error reading the tar: raises under ``"raise"``; otherwise its description
        (what it costs is counted by :meth:`lost` at the end of the shard)."""
        what = describe(exn)
        if self.on_error == "raise":
            self._fail(f"bad data in shard {shard}: {what} (data.on_error=raise)", exn)
        return what

    def note(self, shard: str, message: str) -> None:
        """A problem worth one warning per shard (and per loader and worker)."""
        if (shard, message) not in self._noted:
            self._noted.add((shard, message))
            log.warning("%s", one_line(message))

    def problem(self, shard: str, what: str) -> None:
        """A shard that is not what the manifest says, though nothing is lost (yet)."""
        if self.on_error == "raise":
            self._fail(f"shard {shard} {what} (data.on_error=raise)")
        self.note(shard, f"shard {shard} {what}")

    def take(self) -> int:
        """Errors counted since the last call."""
        delta, self._taken = self.count - self._taken, self.count
        return delta
