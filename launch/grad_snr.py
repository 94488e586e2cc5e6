"""Encoder-gradient signal-to-noise ratio of the estimators along a run (issue 18).

The command's logic is `mmvae.cli.grad_snr` (`main(argv)`); this file is its entry point.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from mmvae.cli.grad_snr import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
