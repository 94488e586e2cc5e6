"""PolyMNIST from its published folders into WebDataset shards:

    python launch/shard_polymnist.py --polymnist data/PolyMNIST --out shards/polymnist

--polymnist DIR holds train/m0..m4/ and test/m0..m4/ of RGB images named <index>.<label>.png;
image <index> of every modality forms one sample (same label in all). Offline stand-in with the
same format: `python launch/shard_demo.py --dataset polydigits --out DIR`. --encoding npy
(default: raw uint8 images, fastest to load) or png (smaller shards); both lossless."""
from __future__ import annotations

import argparse

from mmvae.argv import OneLineParser, build_shards
from mmvae.data.recipes.common import DEFAULT_ENCODING
from mmvae.data.samples import IMAGE_ENCODINGS


def parse_args(argv):
    """The options, checked (one line and exit 2 for a bad one)."""
    parser = OneLineParser(prog="shard_polymnist.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--polymnist", required=True, help="folder with train/m*/ and test/m*/")
    parser.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--shard-size-mb", type=float, default=256)
    parser.add_argument("--min-shards", type=int, default=16, help="at least this many shards per split")
    parser.add_argument("--encoding", choices=IMAGE_ENCODINGS, default=DEFAULT_ENCODING, help="images as raw uint8 .npy (default: %(default)s; fastest to load, shards 1.3-1.6x larger) or png; docs/data.md, Throughput")
    args = parser.parse_args(argv)
    if args.min_shards < 1 or args.shard_size_mb <= 0:
        parser.error("--min-shards must be >= 1 and --shard-size-mb > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    from mmvae.data.recipes.common import InputError
    from mmvae.data.recipes.polymnist import build_polymnist

    return build_shards(
        args.out, lambda: build_polymnist(args.polymnist, args.out, shard_size_mb=args.shard_size_mb,
                                          min_shards=args.min_shards, encoding=args.encoding),
        lambda m: f"polymnist ({', '.join(m['params']['modalities'])})", bad_input=(InputError,))

