"""Build a built-in offline dataset's shards:

    python launch/shard_demo.py --dataset digits --out shards/demo-digits [--pairs-per-instance 20]
    python launch/shard_demo.py --dataset shapes --out shards/demo-shapes  [--scenes 3000 1000]
    python launch/shard_demo.py --dataset shapes_simple --out shards/demo-shapes-simple
    python launch/shard_demo.py --dataset shapes_ft --out shards/demo-shapes-ft   # + 2048-d features
    python launch/shard_demo.py --dataset polydigits --out shards/demo-polydigits [--samples 10000 2000]

digits: MNIST-SVHN-shaped pairs; shapes: CUB-shaped image-caption pairs (shapes_simple: one
object per image and three fixed phrasings, the caption demo's data; shapes_ft adds stand-in
2048-d features for the cubISft models); polydigits: PolyMNIST-shaped, one digit class in five
textured 3×28×28 modalities m0..m4. digits and polydigits store images as raw uint8 .npy
(--encoding npy, the default: fastest to load) or PNG (--encoding png: smaller shards)."""
from __future__ import annotations

import argparse

from mmvae.argv import OneLineParser, build_shards
from mmvae.data.samples import IMAGE_ENCODINGS

OPTIONS = {"--pairs-per-instance": ("digits",), "--scenes": ("shapes", "shapes_ft", "shapes_simple"),
           "--samples": ("polydigits",), "--encoding": ("digits", "polydigits")}


def parse_args(argv):
    """The options, checked (one line and exit 2 for a bad one)."""
    parser = OneLineParser(prog="shard_demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="digits | shapes | shapes_simple | shapes_ft | polydigits")
    parser.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs-per-instance", type=int, help="digits: pairs per image (default 20)")
    parser.add_argument("--scenes", type=int, nargs=2, metavar=("TRAIN", "TEST"),
                        help="shapes: number of train and test scenes (default 3000 1000)")
    parser.add_argument("--samples", type=int, nargs=2, metavar=("TRAIN", "TEST"),
                        help="polydigits: number of train and test samples (default 10000 2000)")
    parser.add_argument("--encoding", choices=IMAGE_ENCODINGS,
                        help="digits, polydigits: images as raw uint8 .npy (default; fastest to load) or png "
                             "(smaller shards); shapes keep JPEG")
    args = parser.parse_args(argv)

    from mmvae.data.builtin import BUILTINS

    if args.dataset not in BUILTINS:
        parser.error(f"unknown --dataset {args.dataset!r}; valid: {', '.join(sorted(BUILTINS))}")
    if args.pairs_per_instance is not None and args.pairs_per_instance < 1:
        parser.error(f"--pairs-per-instance must be >= 1, got {args.pairs_per_instance}")
    if args.scenes is not None and min(args.scenes) < 1:
        parser.error(f"--scenes must be >= 1, got {args.scenes}")
    if args.samples is not None and min(args.samples) < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    for option, datasets in OPTIONS.items():
        if getattr(args, option[2:].replace("-", "_")) is not None and args.dataset not in datasets:
            parser.error(f"{option} applies to --dataset {' / '.join(datasets)}, not {args.dataset}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    from mmvae.data.builtin import BUILTINS

    kwargs = {"seed": args.seed}
    if args.pairs_per_instance is not None:
        kwargs["pairs_per_instance"] = args.pairs_per_instance
    if args.scenes is not None:
        kwargs["train_scenes"], kwargs["test_scenes"] = args.scenes
    if args.samples is not None:
        kwargs["train_samples"], kwargs["test_samples"] = args.samples
    if args.encoding is not None:
        kwargs["encoding"] = args.encoding
    return build_shards(args.out, lambda: BUILTINS[args.dataset](args.out, **kwargs),
                        lambda m: args.dataset)

