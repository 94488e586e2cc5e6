"""Evaluate a run: `python launch/evaluate.py --run RUN_DIR [--metrics a,b] [key=value ...]`.

The command's logic is `mmvae.cli.evaluate` (`main(argv)`); this file is its entry point.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from mmvae.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
