"""The data layer's errors: bad input (one line, exit 2) and bad data met while streaming."""
from __future__ import annotations

from mmvae.config import ConfigError


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
