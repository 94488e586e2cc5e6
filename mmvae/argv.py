"""What every entry point shares on its command line: argparse errors as one line with exit 2,
and the one-line refusal of an output folder that cannot be written (checked before any work)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
