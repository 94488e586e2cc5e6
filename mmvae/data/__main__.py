"""``python -m mmvae.data verify DIR``: check every shard's sha256, size and sample count (and
the side files' sha256) against ``DIR/manifest.json``; DIR may be an ``http(s)://`` prefix.
``--samples`` also decodes every sample and checks it against the manifest's modality spec.
Every problem is printed on its own line. Exit 0 if all match, 1 naming the bad shard(s),
2 on usage errors or a missing, unreadable or invalid manifest (nothing is opened then)."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from mmvae.data.checks import manifest_report, sample_problems, verify_shards
from mmvae.data.errors import ShardsError


def _verify(shards_dir: str, console: Console, decode: bool = False) -> int:
    manifest, problems = manifest_report(shards_dir)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        print(f"error: {len(problems)} problem(s) in the manifest of {shards_dir}: fix or rebuild it",
              file=sys.stderr)
        return 2
    table = Table(title=f"shards in {shards_dir}")
    for column in ("split", "file", "samples", "sha256", "status"):
        table.add_column(column)
    bad = []
    for split, entry, result in verify_shards(shards_dir):
        samples = "-" if entry.get("count") is None else f"{result['count']}/{entry['count']}"
        table.add_row(split, entry["file"], samples, entry["sha256"][:12],
                      "[green]ok[/]" if result["ok"] else f"[red]{result['problem']}[/]")
        bad += [f"{shards_dir}: {entry['file']}: {problem}" for problem in result["problems"]]
    console.print(table)
    if decode:
        bad += list(sample_problems(shards_dir))
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmvae.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check shards against manifest.json")
    verify.add_argument("dir", help="shards folder (holds manifest.json) or http(s):// prefix")
    verify.add_argument("--samples", action="store_true",
                        help="also decode every sample and check it against the manifest's modality "
                             "spec (shape, dtype, caption length, finite values); slow")
    args = parser.parse_args(argv)
    try:
        return _verify(args.dir, Console(), decode=args.samples)
    except ShardsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
