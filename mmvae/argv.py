"""What every entry point shares on its command line: argparse errors as one line with exit 2,
and the one-line refusal of an output folder that cannot be written (checked before any work)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from mmvae.paths import unwritable


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2 (bad input), not usage plus message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def refuse_unwritable(folder: str | Path, option: str = "--out") -> bool:
    """True (after printing the one-line error) when `folder` cannot be created and written."""
    if problem := unwritable(folder):
        print(f"error: {option} {folder} cannot be written: {problem}; choose another folder",
              file=sys.stderr)
        return True
    return False


def build_shards(out, build: Callable[[], dict], name: Callable[[dict], str], *,
                 bad_input: tuple = (), unit: str = "samples") -> int:
    """The shard scripts' common run: refuse an unwritable `out`, call `build()` (which returns
    the manifest) and print one summary line `<name> -> out (counts) in T s`. An error of the
    `bad_input` types is one line and exit 2; an OSError (disk full, I/O) one line and exit 1 --
    the manifest is written last, so the folder reads as not built and a rerun starts over."""
    if refuse_unwritable(out):
        return 2
    start = time.perf_counter()
    try:
        manifest = build()
    except bad_input as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: building {out} failed: {err}; free space or choose another folder and "
              f"run again", file=sys.stderr)
        return 1
    counts = ", ".join(f"{split}: {info['num_samples']} {unit} in {len(info['shards'])} shards"
                       for split, info in manifest["splits"].items())
    print(f"{name(manifest)} -> {out} ({counts}) in {time.perf_counter() - start:.1f} s")
    return 0
