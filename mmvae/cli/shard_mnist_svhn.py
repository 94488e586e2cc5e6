"""Pair MNIST and SVHN by class into WebDataset shards (MMVAE recipe, seeded):

    python launch/shard_mnist_svhn.py --mnist data/mnist --svhn data/svhn --out shards/mnist_svhn

--mnist DIR holds train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-... (or
DIR/MNIST/raw/ as torchvision leaves it); --svhn DIR holds train_32x32.mat and test_32x32.mat.
--pairs-per-instance: 20 as the paper's text (its code used 30). --encoding npy (default: raw
uint8 images, fastest to load) or png (smaller shards); both lossless. --download DIR fetches the
published files into DIR/mnist and DIR/svhn first (resumed, checksums checked: docs/data.md)."""
from __future__ import annotations

import argparse

from mmvae.argv import OneLineParser, build_shards
from mmvae.data.recipes.common import DEFAULT_ENCODING
from mmvae.data.samples import IMAGE_ENCODINGS


def parse_args(argv):
    """The options, checked."""
    parser = OneLineParser(prog="shard_mnist_svhn.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", help="folder with the MNIST idx files")
    parser.add_argument("--svhn", help="folder with train_32x32.mat, test_32x32.mat")
    parser.add_argument("--download", metavar="DIR", help="download MNIST and SVHN into DIR first")
    parser.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--pairs-per-instance", type=int, default=20, help="dm (paper text 20, code 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-per-class", type=int, default=10_000, help="cap per class (paper: 10000)")
    parser.add_argument("--shard-size-mb", type=float, default=256)
    parser.add_argument("--min-shards", type=int, default=16, help="at least this many shards per split")
    parser.add_argument("--encoding", choices=IMAGE_ENCODINGS, default=DEFAULT_ENCODING, help="images as raw uint8 .npy (default: %(default)s; fastest to load, shards 1.3-1.6x larger) or png; docs/data.md, Throughput")
    args = parser.parse_args(argv)
    if args.pairs_per_instance < 1 or args.max_per_class < 1 or args.min_shards < 1 or args.shard_size_mb <= 0:
        parser.error("--pairs-per-instance, --max-per-class, --min-shards must be >= 1 and --shard-size-mb > 0")
    if not args.download and not (args.mnist and args.svhn):
        parser.error("give --mnist DIR and --svhn DIR, or --download DIR")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    from mmvae.data.recipes.common import InputError
    from mmvae.data.recipes.mnist_svhn import build_mnist_svhn

    def build():
        if args.download:
            from mmvae.data.sources import fetch_mnist_svhn

            args.mnist, args.svhn = fetch_mnist_svhn(args.download)
        return build_mnist_svhn(args.mnist, args.svhn, args.out, seed=args.seed,
                                pairs_per_instance=args.pairs_per_instance, max_per_class=args.max_per_class,
                                shard_size_mb=args.shard_size_mb, min_shards=args.min_shards,
                                encoding=args.encoding)

    return build_shards(args.out, build, lambda m: "mnist_svhn", bad_input=(InputError,), unit="pairs")

