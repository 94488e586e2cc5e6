"""Data-pipeline throughput (decoded samples/s) on shards of the real formats (a benchmark, not a test).

    python benchmarks/bench_data.py                       # 20k samples per format, workers 0 and 2
    python benchmarks/bench_data.py --samples 50000 --workers 0 2 4 --repeats 3
    python benchmarks/bench_data.py --samples 5000 --baseline /path/to/other/checkout   # before/after
    python benchmarks/bench_data.py --stages --samples 10000    # per-stage cost, per recipe and encoding

Builds, in a temporary folder, MNIST-SVHN shards with the real recipe from fake idx/.mat files
(handwritten 8×8 digits upsampled to 28×28, rendered SVHN-like crops: PNG sizes like the real
ones) and CUB-format shards (64×64 JPEG scenes with photo-like noise, 32-id captions and 2048-d
float32 features), then times one training epoch (drop_last, shuffle buffer 1000) of:
mnist_svhn (mnist+svhn, B=128), cubIS (image+caption, B=64), cubISft (feature+caption, B=64).
Rates exclude the first batch (worker start-up, shown separately); each cell is the best of
--repeats runs. With 0 workers the CPU time of this process is also shown (robust to load
from other processes); with workers only wall time is meaningful, so check `uptime`.

``--baseline CHECKOUT`` compares this checkout's loader with another's (e.g. the main branch
before a change) on the same shards: each timing runs in a fresh process with 0 workers,
alternating the two checkouts --repeats times, and the ratio of their median CPU-time rates
is printed (CPU time: robust to other load on the machine, not to cache effects). It also
times ``data.verify=sha256`` on the shards (just written, so from the page cache: the hashing
cost, not the disk's).

``--stages`` measures the decode cost per sample by stage, for each recipe (mnist_svhn,
polydigits, cub-like) and image encoding (png, npy; CUB is JPEG only), in this process with
one torch thread, with each ``data.tar_reader`` (webdataset, fast): read (tar members -> samples, key selection), decode + spec check, collate,
to-tensor (numpy -> torch, uint8 -> float), the rest of a real loader epoch (shuffle buffer,
pipeline glue), all in CPU µs per sample, then the loader's pairs/s per core (CPU time, 0
workers) and the shards' bytes per sample. Ends with one JSON line of the same figures.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from mmvae.paths import unwritable  # noqa: E402

SETS = {"mnist_svhn": ("mnist_svhn", ["mnist", "svhn"], 128), "cubIS": ("cub", ["image", "caption"], 64),
        "cubISft": ("cub", ["feature", "caption"], 64)}


def fake_mnist_svhn(root: Path, samples: int, encoding: str = "png") -> Path:
    """Real-format raw files, then the real recipe: ~``samples`` train pairs."""
    import gzip

    from scipy.io import savemat

    from mmvae.data.recipes.digits import available_fonts, load_handwritten, render_printed, to_mnist
    from mmvae.data.recipes.mnist_svhn import build_mnist_svhn

    images8, labels = load_handwritten()
    mnist = np.concatenate([to_mnist(x) for x in images8])                 # (N, 28, 28)
    fonts = available_fonts()
    svhn = np.stack([render_printed(int(d), np.random.default_rng([1, i]), fonts) for i, d in enumerate(labels)])
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    (root / "svhn").mkdir(exist_ok=True)
    for split, sl in (("train", slice(None)), ("test", slice(0, 200))):
        prefix = "train" if split == "train" else "t10k"
        for name, arr, magic in (("images-idx3", mnist[sl], 2051), ("labels-idx1", labels[sl], 2049)):
            header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *arr.shape))
            payload = gzip.compress(header + arr.astype(np.uint8).tobytes())
            (root / "mnist" / f"{prefix}-{name}-ubyte.gz").write_bytes(payload)
        y = labels[sl].copy()
        y[y == 0] = 10
        savemat(root / "svhn" / f"{split}_32x32.mat", {"X": svhn[sl].transpose(2, 3, 1, 0), "y": y[:, None]})
    dm = -(-samples // len(labels))
    start = time.perf_counter()
    out = root / f"mnist_svhn_{encoding}"
    build_mnist_svhn(root / "mnist", root / "svhn", out, pairs_per_instance=dm, encoding=encoding, progress=False)
    print(f"built mnist_svhn {encoding} ({dm * len(labels)} train pairs) in {time.perf_counter() - start:.1f} s")
    return out


def fake_cub(root: Path, samples: int) -> Path:
    """CUB-format shards (all keys incl. feature.npy) from noisy shape scenes and their captions."""
    from PIL import Image

    from mmvae.data.recipes import captions as cap
    from mmvae.data.recipes import shapes
    from mmvae.data.writer import write_manifest

    out = root / "cub"
    out.mkdir()
    splits = {}
    for split, n_img in (("train", -(-samples // 10)), ("test", 100)):
        images, captions, attrs = shapes.scenes(split, n_img, 0)
        rng = np.random.default_rng(0)
        noisy = np.clip(images + rng.normal(0, 12, images.shape), 0, 255).astype(np.uint8)  # photo-like JPEG size
        jpegs = [cap.encode_jpeg(Image.fromarray(x.transpose(1, 2, 0))) for x in noisy]
        if split == "train":
            vocab = cap.build_vocab([cap.tokenize(c) for c in captions])
        features = rng.gamma(0.5, 0.8, (n_img, 2048)).astype(np.float32)     # non-negative like avgpool output
        splits[split] = cap.write_caption_shards(out, split, images_jpg=jpegs, labels=attrs["shape"], captions=captions,
                                                 ids=cap.encode_all(captions, vocab), features=features, seed=0,
                                                 shard_size_mb=256, min_shards=16, progress=False)
    write_manifest(out, "cub_ft", {"fake": True}, splits, sample_keys=cap.CAPTION_KEYS + ["feature.npy"])
    print(f"built CUB-format shards: {splits['train'][0]['bytes'] / splits['train'][0]['count']:.0f} bytes/sample")
    return out


def time_epoch(shards: Path, modalities, batch_size: int, workers: int) -> dict:
    from mmvae.data.pipeline import make_loader

    loader = make_loader(shards, "train", batch_size=batch_size, modalities=modalities, num_workers=workers)
    wall0 = time.perf_counter()
    n = 0
    for i, batch in enumerate(loader):
        if i == 0:
            first, wall1, cpu1 = time.perf_counter() - wall0, time.perf_counter(), time.process_time()
        else:
            n += len(batch[modalities[0]])
    wall, cpu = time.perf_counter() - wall1, time.process_time() - cpu1
    return {"wall": n / wall, "cpu": n / cpu if workers == 0 else None, "first": first, "errors": loader.errors}


# One epoch timed in a fresh process that imports mmvae from the checkout on PYTHONPATH.
_CHILD = """
import json, sys, time
from mmvae.data.pipeline import make_loader
shards, modalities, batch_size = json.loads(sys.argv[1])
loader = make_loader(shards, "train", batch_size=batch_size, modalities=modalities, num_workers=0)
n, batches = 0, iter(loader)
next(batches)
cpu = time.process_time()
for batch in batches:
    n += len(batch[modalities[0]])
print(json.dumps({"cpu": n / (time.process_time() - cpu), "errors": loader.errors}))
"""


def child_rate(checkout: Path, shards: Path, modalities, batch_size: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([str(shards), modalities, batch_size])],
                         env=env, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])["cpu"]


def compare(built: dict, sets, baseline: Path, repeats: int) -> None:
    """Interleaved before/after: baseline, this, baseline, this, ... per pipeline."""
    here = Path(__file__).resolve().parent.parent
    print(f"{'pipeline':<11} {'baseline (cpu samples/s)':>25} {'this (cpu samples/s)':>21} {'this/baseline':>14}")
    for name in sets:
        kind, modalities, batch_size = SETS[name]
        rates = {"baseline": [], "this": []}
        for _ in range(repeats):
            for which, checkout in (("baseline", baseline), ("this", here)):
                rates[which].append(child_rate(checkout, built[kind], modalities, batch_size))
        before, after = statistics.median(rates["baseline"]), statistics.median(rates["this"])
        print(f"{name:<11} {before:>25.0f} {after:>21.0f} {after / before:>14.3f}   "
              f"(runs: {', '.join(f'{r:.0f}' for r in rates['baseline'])} | "
              f"{', '.join(f'{r:.0f}' for r in rates['this'])})", flush=True)


def time_sha256(built: dict) -> None:
    from mmvae.data.checks import check_shards

    for kind, shards in built.items():
        report = check_shards(shards, ["train", "test"], verify="sha256")
        print(report.timing())


# ----------------------------------------------------------------------------- --stages
def fake_polydigits(root: Path, samples: int, encoding: str) -> Path:
    from mmvae.data.recipes.polydigits import build_polydigits

    out = root / f"polydigits_{encoding}"
    build_polydigits(out, train_samples=samples, test_samples=200, encoding=encoding, progress=False)
    return out


def _cpu(fn, repeats: int = 3):
    """(result, least CPU seconds of ``repeats`` runs). The garbage collector is off while
    timing: the stages' outputs are kept in lists here, which a loader never does, and the
    collector's passes over them would be charged to whichever stage is running."""
    import gc

    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            start = time.process_time()
            result = fn()
            best = min(best, time.process_time() - start)
        finally:
            gc.enable()
    return result, best


def stage_costs(shards: Path, modalities, batch_size: int, tar_reader: str) -> dict:
    """CPU µs per sample of each stage over the train split, and the loader's samples/s."""
    from mmvae.data.decode import Decode, ToTensors, collate, images_to_float
    from mmvae.data.errors import ErrorCounter
    from mmvae.data.pipeline import ReadShards, SelectKeys, split_info, make_loader

    info, errors = split_info(shards, "train"), ErrorCounter("raise")
    stems = list(modalities) + ["label"]
    samples, t_read = _cpu(lambda: list(SelectKeys(stems, errors)(
        ReadShards(info.store, info.expected, errors, tar_reader)({"url": f} for f in info.files))))
    decoded, t_decode = _cpu(lambda: list(Decode(errors, info.spec)(samples)))
    groups = [decoded[i:i + batch_size] for i in range(0, len(decoded) - batch_size + 1, batch_size)]
    batches, t_collate = _cpu(lambda: [collate(g) for g in groups])
    _, t_tensor = _cpu(lambda: [images_to_float(b) for b in ToTensors(False)(batches)])
    n, per = len(decoded), 1e6 / len(decoded)
    used = sum(len(g) for g in groups)
    loader = make_loader(shards, "train", batch_size=batch_size, modalities=modalities, tar_reader=tar_reader)
    count, t_loader = _cpu(lambda: sum(len(b[modalities[0]]) for b in loader))
    costs = {"read": t_read * per, "decode+check": t_decode * per, "collate": t_collate * 1e6 / used,
             "to_tensor": t_tensor * 1e6 / used}
    total = t_loader * 1e6 / count
    costs["other"] = max(0.0, total - sum(costs.values()))
    nbytes = sum(info.sizes) / n
    return {"us": costs, "total_us": total, "per_core": count / t_loader, "bytes_per_sample": nbytes}


def run_stages(root: Path, samples: int) -> None:
    import torch

    torch.set_num_threads(1)
    plan = [("mnist_svhn", enc, lambda e: fake_mnist_svhn(root, samples, e), ["mnist", "svhn"], 128)
            for enc in ("png", "npy")]
    plan += [("polydigits", enc, lambda e: fake_polydigits(root, samples, e), [f"m{i}" for i in range(5)], 256)
             for enc in ("png", "npy")]
    plan += [("cub-like", "jpg", lambda e: fake_cub(root, samples), ["image", "caption"], 64)]
    print(f"load average before timing: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'recipe':<11} {'enc':<4} {'tar':<10} {'B':>4} {'read':>6} {'decode':>7} {'collate':>7} {'tensor':>6} "
          f"{'other':>6} {'total µs':>8} {'samples/s/core':>14} {'bytes/sample':>12}")
    rows = []
    built = {}
    for (recipe, encoding, build, modalities, batch_size), reader in itertools.product(plan, ("webdataset", "fast")):
        if (recipe, encoding) not in built:
            built[recipe, encoding] = build(encoding)
        result = stage_costs(built[recipe, encoding], modalities, batch_size, reader)
        us = result["us"]
        print(f"{recipe:<11} {encoding:<4} {reader:<10} {batch_size:>4} {us['read']:>6.1f} {us['decode+check']:>7.1f} "
              f"{us['collate']:>7.1f} {us['to_tensor']:>6.1f} {us['other']:>6.1f} {result['total_us']:>8.1f} "
              f"{result['per_core']:>14,.0f} {result['bytes_per_sample']:>12,.0f}", flush=True)
        rows.append({"recipe": recipe, "encoding": encoding, "tar_reader": reader, "batch_size": batch_size,
                     **result})
    load = os.getloadavg()[0]
    print(f"load average after: {load:.1f}")
    print(json.dumps({"bench": "data_stages", "samples": samples, "load": load, "cores": os.cpu_count(),
                      "rows": rows}))


def parse_args(argv):
    """The options, checked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000, help="train samples per format")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--dir", help="keep the shards here (default: a temporary folder)")
    parser.add_argument("--stages", action="store_true",
                        help="per-stage cost per recipe and encoding, and pairs/s per core (see above)")
    parser.add_argument("--baseline", type=Path,
                        help="another checkout: compare its loader with this one's (see above)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dir and (problem := unwritable(args.dir)):
        print(f"error: --dir {args.dir} cannot be written: {problem}", file=sys.stderr)
        return 2
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_data_"))
    try:
        if args.stages:
            run_stages(root, args.samples)
            return 0
        built = {}
        if "mnist_svhn" in args.sets:
            built["mnist_svhn"] = fake_mnist_svhn(root, args.samples)
        if {"cubIS", "cubISft"} & set(args.sets):
            built["cub"] = fake_cub(root, args.samples)
        print(f"load average before timing: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        if args.baseline:
            compare(built, args.sets, args.baseline.resolve(), args.repeats)
            time_sha256(built)
            print(f"load average after: {os.getloadavg()[0]:.1f}")
            return 0
        print(f"{'pipeline':<11} {'B':>4} {'workers':>7} {'samples/s (wall)':>17} {'samples/s (cpu)':>16} "
              f"{'first batch s':>13}")
        for name in args.sets:
            kind, modalities, batch_size = SETS[name]
            for workers in args.workers:
                runs = [time_epoch(built[kind], modalities, batch_size, workers) for _ in range(args.repeats)]
                best = max(runs, key=lambda r: r["wall"])
                cpu = max((r["cpu"] for r in runs if r["cpu"]), default=None)
                print(f"{name:<11} {batch_size:>4} {workers:>7} {best['wall']:>17.0f} "
                      f"{(f'{cpu:.0f}' if cpu else '-'):>16} {min(r['first'] for r in runs):>13.2f}", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
