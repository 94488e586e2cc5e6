"""``python -m mmvae.data verify DIR``: check every shard's sha256 and sample count (and the
side files' sha256) against ``DIR/manifest.json``. Exit 0 if all match, 1 naming the bad
shard(s) otherwise, 2 on usage errors or a missing/invalid manifest."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from mmvae.data.writer import verify_shards


def _verify(shards_dir: str, console: Console) -> int:
    table = Table(title=f"shards in {shards_dir}")
    for column in ("split", "file", "samples", "sha256", "status"):
        table.add_column(column)
    bad = []
    for split, entry, result in verify_shards(shards_dir):
        samples = "-" if entry.get("count") is None else f"{result['count']}/{entry['count']}"
        table.add_row(split, entry["file"], samples, entry["sha256"][:12],
                      "[green]ok[/]" if result["ok"] else f"[red]{result['problem']}[/]")
        if not result["ok"]:
            bad.append(f"{entry['file']}: {result['problem']}")
    console.print(table)
    if bad:
        print(f"error: {len(bad)} bad file(s) in {shards_dir}: {'; '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmvae.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check shards against manifest.json")
    verify.add_argument("dir", help="shards folder (holds manifest.json)")
    args = parser.parse_args(argv)
    try:
        return _verify(args.dir, Console())
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
