"""Import one of the paper's released models as a run folder of ours (or export one back).

The command's logic is `mmvae.cli.import_paper_model` (`main(argv)`); this file is its entry point.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from mmvae.cli.import_paper_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
