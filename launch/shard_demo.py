"""Build a built-in offline dataset's shards.

The command's logic is `mmvae.cli.shard_demo` (`main(argv)`); this file is its entry point.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from mmvae.cli.shard_demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
