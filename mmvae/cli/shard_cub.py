"""CUB image-caption shards (the authors' cleaned folder: train/, test/, text_*.txt):

    python launch/shard_cub.py --cub data/cub --out shards/cub                     # cubIS
    python launch/shard_cub.py --cub data/cub --out shards/cub_ft \\
        --features resnet101 --weights data/weights/resnet101-63fe2227.pth          # cubISft

--weights (or --random-weights, for tests) implies --features resnet101. --download DIR fetches
cub.zip into DIR and extracts it safely (and, with --features and no --weights, the ResNet-101
weights into DIR/weights) first: docs/data.md."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from mmvae.argv import OneLineParser, build_shards


def parse_args(argv):
    """The options, checked."""
    parser = OneLineParser(prog="shard_cub.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cub", help="CUB folder (train/, test/, text_*.txt)")
    parser.add_argument("--download", metavar="DIR", help="download and extract cub.zip into DIR first")
    parser.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--features", choices=["resnet101"], help="add 2048-d ResNet-101 features (cubISft)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="local torchvision resnet101 weights file (.pth)")
    weights.add_argument("--random-weights", action="store_true", help="random ResNet weights (tests only)")
    parser.add_argument("--imagenet-norm", action="store_true", help="ImageNet mean/std (the paper had none)")
    parser.add_argument("--seed", type=int, default=0, help="sample write order")
    parser.add_argument("--shard-size-mb", type=float, default=256)
    parser.add_argument("--min-shards", type=int, default=16, help="at least this many shards per split")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image reading processes")
    parser.add_argument("--batch-size", type=int, default=64, help="ResNet batch size")
    parser.add_argument("--device", help="ResNet device (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.min_shards < 1 or args.shard_size_mb <= 0 or args.workers < 0 or args.batch_size < 1:
        parser.error("--min-shards, --batch-size must be >= 1, --workers >= 0, --shard-size-mb > 0")
    if (args.weights or args.random_weights) and not args.features:
        args.features = "resnet101"
    if not args.cub and not args.download:
        parser.error("give --cub DIR or --download DIR")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    from mmvae.data.recipes.common import InputError
    from mmvae.data.recipes.cub import build_cub

    def build():
        if args.download:
            from mmvae.data.sources import fetch_cub, fetch_resnet101

            args.cub = fetch_cub(args.download)
            if args.features and not (args.weights or args.random_weights):
                args.weights = fetch_resnet101(Path(args.download) / "weights")
        return build_cub(args.cub, args.out, features=args.features, weights=args.weights,
                         random_weights=args.random_weights, imagenet_norm=args.imagenet_norm, seed=args.seed,
                         shard_size_mb=args.shard_size_mb, min_shards=args.min_shards, workers=args.workers,
                         feature_batch_size=args.batch_size, device=args.device)

    return build_shards(args.out, build, bad_input=(InputError,), name=lambda m: (
        f"{m['dataset']} (vocabulary {m['params']['vocab_size']} words)"))

