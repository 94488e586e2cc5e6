"""Train a model: `accelerate launch launch/train.py --config configs/demo.yaml [key=value ...]`.

The command's logic is `mmvae.cli.train` (`main(argv)`); this file is its entry point, for
`python launch/train.py` and `accelerate launch launch/train.py`.
"""
import signal
import sys
from pathlib import Path

if __name__ == "__main__":
    # SLURM's warning signal (SIGUSR1, launch/slurm/) may come while torch is still importing;
    # by default it would kill the process. Hold it pending until the trainer can act on it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from mmvae.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
