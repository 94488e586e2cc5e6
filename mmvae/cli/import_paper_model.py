"""Import one of the paper's released models as a run folder of ours (or export one back):

    python launch/import_paper_model.py mnist-svhn.zip --out runs/paper/mnist_svhn [--shards DIR]
    python launch/import_paper_model.py mnist-svhn --download data/pretrained --out runs/paper/mnist_svhn
    python launch/import_paper_model.py runs/x --out paper_folder --export

PATH is the paper's model folder (model.rar + args.rar) or its zip; with --download DIR, PATH
names a released model (mnist-svhn, cubIS, cubISft) fetched into DIR first. The run folder
works with `launch/evaluate.py --run RUN_DIR`, `mmvae.load_model(RUN_DIR)` and fine-tuning by
`launch/train.py --config RUN_DIR/config.yaml train.init_from=RUN_DIR run.dir=NEW_DIR`.
--export writes the paper's model.rar + args.rar for our run folder PATH into --out."""
from __future__ import annotations

import argparse
import sys

from mmvae.argv import OneLineParser


def parse_args(argv):
    """The options, checked."""
    p = OneLineParser(prog="import_paper_model.py", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="paper model folder or .zip (or a run folder with --export)")
    p.add_argument("--out", required=True, help="the run folder to create (with --export: a folder)")
    p.add_argument("--export", action="store_true", help="our run folder PATH -> paper format")
    p.add_argument("--shards", help="data.shards of the run (default: shards/<dataset>)")
    p.add_argument("--download", metavar="DIR", help="fetch the released model PATH into DIR first")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    from mmvae.data.recipes.common import InputError
    from mmvae.interop.paper import InteropError, export_paper_model, import_paper_model

    try:
        if args.export:
            out = export_paper_model(args.path, args.out)
            print(f"exported {args.path} -> {out}/model.rar, {out}/args.rar")
            return 0
        path = args.path
        if args.download:
            from mmvae.data.sources import fetch_pretrained

            path = fetch_pretrained(args.path, args.download)
        record = import_paper_model(path, args.out, shards=args.shards)
    except (InteropError, InputError) as err:
        print(f"error: {(str(err).splitlines() or [type(err).__name__])[0]}", file=sys.stderr)
        return 2
    print(f"imported paper {record['paper_model']} ({record['tensors']} tensors) -> {args.out}")
    return 0

