"""Estimator seed study (issue 18): train + evaluate variants x seeds x budgets, write one table.

The command's logic is `mmvae.cli.estimator_study` (`main(argv)`); this file is its entry point.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from mmvae.cli.estimator_study import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
