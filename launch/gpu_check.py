"""The CUDA paths that no CPU test reaches, in one run: `scripts/gpu_check.sh [--dry-run]`.

    scripts/gpu_check.sh              # one GPU, <= 8 minutes
    scripts/gpu_check.sh --dry-run    # the same code at tiny sizes on the CPU (tests, CI)

Sections (each reports its own result; one failing does not stop the others):

* ``steps``: the trainer's own step (`mmvae.train.step.train_step`: noise, backward through
  accelerate, GradScaler, optimiser) in fp32, bf16 and fp16 for mnist_svhn (dreg looser, K=30,
  B=128 and 512) and cubIS (dreg looser, K=50, B=64, V=1590): step time, samples/s, peak memory,
  and the efficiency against the device's own matmul peak in that precision (`mmvae.perf`: FLOP
  of the step counted once before the timing, peak measured in the same process, cached per
  precision);
* ``k_chunk_memory``: peak memory of one mnist_svhn step at K=1000 with k_chunk=50;
* ``fp16_overflow``: an fp16 step forced to overflow (loss scale set to 3e38) must be skipped,
  lower the scale, and the next step must run;
* ``deepspeed``: ZeRO-2 through `accelerate launch` (configs/accelerate/deepspeed_zero2.yaml),
  fp32 and bf16: train 4 steps; train 2, then `--resume auto` to 4; same final weights;
* ``cuda_memory_after``: torch.cuda memory still allocated once the in-process sections are done.

Prints progress on stderr and one JSON line on stdout: {"ok": all sections that ran passed,
"sections": {...}, "environment": {...}}. Exit code 0 when ok, 1 otherwise. Needs torch and
accelerate only; the DeepSpeed section is skipped, with the reason, without deepspeed,
webdataset or scikit-learn (the GPU machine may lack them: carry their wheels). The dry run on a
CPU uses a stand-in `torch.amp.GradScaler("cpu")` for fp16 (accelerate gives CPUs no scaler),
starting at scale 2^10 (`DRY_FP16_SCALE`) so that its warm-up wastes fewer slow CPU fp16 steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_cub import random_batch as cub_inputs  # noqa: E402
from mmvae import perf  # noqa: E402
from mmvae.config import load_config  # noqa: E402
from mmvae.registry import build_model  # noqa: E402
from mmvae.train.dist import make_accelerator, make_layout, release  # noqa: E402
from mmvae.train.optim import make_optimizer  # noqa: E402
from mmvae.train.step import ObjectiveModule, estimator_for, train_step  # noqa: E402

PRECISIONS = ("no", "bf16", "fp16")
# (name, model overrides, K, B) at full size and for --dry-run.
STEP_CASES = {
    False: [("mnist_svhn_B128", "mnist_svhn", 30, 128), ("mnist_svhn_B512", "mnist_svhn", 30, 512),
            ("cubIS_B64", "cubIS", 50, 64)],
    # the dry run checks the code paths, which B512 shares with B128 at tiny sizes
    True: [("mnist_svhn_B128", "mnist_svhn", 2, 4), ("cubIS_B64", "cubIS", 2, 2)],
}
MODEL_OVERRIDES = {"mnist_svhn": ["model.latent_dim=20"],
                   "cubIS": ["model.latent_dim=64", "model.vocab_size=1590"]}
DRY_MODEL_OVERRIDES = {"mnist_svhn": ["model.latent_dim=4"],
                       "cubIS": ["model.latent_dim=4", "model.vocab_size=40"]}
MAX_SETTLE = 40  # warm-up steps at most while an fp16 loss scale settles
DRY_FP16_SCALE = 2.0**10  # the dry run's initial fp16 loss scale (the CUDA scaler's is 2^16)
COMMON = ["objective.name=dreg", "objective.looser=true", "model.learn_prior=true",
          "logging.wandb=disabled", "train.seed=1"]


def log(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


# --- the trainer's step on random data ---------------------------------------------------------

def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process max


def random_batch(model, B: int, vocab_size: int, device) -> dict:
    """Random images in [0, 1] and captions of random tokens (benchmarks/bench_cub.py)."""
    xs = cub_inputs(model, B, vocab_size, torch.Generator().manual_seed(0))
    return {m: x.to(device) for m, x in zip(model.modalities, xs)}


class Trainer:
    """One model, accelerator and optimiser as the trainer builds them, stepping a fixed batch.
    `release()` frees the Accelerator so the next configuration can use another precision."""

    def __init__(self, overrides: list[str], dry_run: bool):
        self.cfg = load_config(None, COMMON + overrides)
        self.acc = make_accelerator(self.cfg)
        self.device = self.acc.device
        self.stand_in = False
        if self.cfg.train.mixed_precision == "fp16" and self.acc.scaler is None and dry_run:
            # accelerate gives CPUs neither fp16 autocast nor a scaler: put the CPU GradScaler
            # where it puts the CUDA one (before prepare, which hands it to the optimiser).
            # Its scale starts at DRY_FP16_SCALE, not 2^16: each warm-up overflow costs a whole
            # fp16 step, seconds on a CPU, and the settling still sees an overflow or two.
            self.acc.scaler = torch.amp.GradScaler("cpu", init_scale=DRY_FP16_SCALE)
            self.acc.native_amp = self.stand_in = True
        layout = make_layout(self.acc, self.cfg)
        torch.manual_seed(self.cfg.train.seed)
        kwargs = dataclasses.asdict(self.cfg.model)
        model = build_model(kwargs.pop("name"), **kwargs)
        optimizer = make_optimizer(model, self.cfg.train.lr)
        wrapped, optimizer = self.acc.prepare(
            ObjectiveModule(model, estimator_for(self.cfg, model.multimodal)), optimizer)
        self.ctx = SimpleNamespace(cfg=self.cfg, model=model, accelerator=self.acc, layout=layout,
                                   step=0, wrapped=wrapped, optimizer=optimizer,
                                   params=[p for p in model.parameters() if p.requires_grad],
                                   looser=self.cfg.objective.looser and model.multimodal)
        self.batch = random_batch(model, self.cfg.data.batch_size, self.cfg.model.vocab_size,
                                  self.device)

    def step(self) -> dict:
        stats = train_step(self.ctx, self.batch)
        self.ctx.step += 1
        return stats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def settle(self, warmup: int) -> int:
        """`warmup` steps; under fp16 more, until one is not skipped: the loss scale starts at
        2^16 and halves at each overflow (routine while it settles: a ~5e3-nat loss needs a few
        halvings). Returns the number of overflow-skipped warm-up steps."""
        skipped = last_skipped = 0
        for i in range(MAX_SETTLE):
            settled = self.acc.scaler is None or (i > 0 and not last_skipped)
            if i >= warmup and settled:
                break
            last_skipped = int(self.step()["skipped"])
            skipped += last_skipped
        return skipped

    def timed(self, warmup: int, steps: int, efficiency: bool = False) -> dict:
        flops = perf.count_flops(self.step) if efficiency else None  # the first warm-up step
        warmup_overflows = self.settle(max(warmup - 1, 0) if efficiency else warmup)
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0, stats = time.perf_counter(), []
        for _ in range(steps):
            stats.append(self.step())
        self.sync()
        seconds = (time.perf_counter() - t0) / steps
        B, K = self.cfg.data.batch_size, self.cfg.objective.K
        eff = (perf.efficiency(flops, seconds, matmul_peak(self.cfg.train.mixed_precision,
                                                           self.device))
               if efficiency else {})
        return {"step_s": round(seconds, 4), "samples_per_s": round(B / seconds, 1),
                "samples_particles_per_s": round(B * K / seconds, 1),
                "peak_mem_mb": peak_mb(self.device), "bound": round(stats[-1]["bound"], 3),
                "skipped_steps": sum(s["skipped"] for s in stats),
                "overflow_steps": sum(bool(s.get("overflow")) for s in stats),
                "warmup_overflows": warmup_overflows,
                # an fp16 overflow (a finite loss, its scaled gradients not) is routine; any
                # other skipped step is a failure
                "ok": all(not s["skipped"] or s.get("overflow", False) for s in stats), **eff}

    def release(self) -> None:
        release(self.acc)
        del self.ctx, self.batch
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


_PEAKS: dict = {}


def matmul_peak(precision: str, device: torch.device) -> perf.Peak:
    """The device's matmul peak in `precision`'s dtype, measured once per run (on a CPU, i.e.
    the dry run, only up to 256^3: it checks the code path, not the CPU)."""
    if precision not in _PEAKS:
        _PEAKS[precision] = perf.matmul_peak(perf.precision_dtype(precision), device,
                                             max_n=256 if device.type == "cpu" else None)
    return _PEAKS[precision]


def precision_override(precision: str) -> str:
    return f"train.mixed_precision='{precision}'"  # quoted: YAML 1.1 reads a bare no as False


def model_overrides(name: str, K: int, B: int, dry_run: bool) -> list[str]:
    extra = (DRY_MODEL_OVERRIDES if dry_run else MODEL_OVERRIDES)[name]
    return [f"model.name={name}", f"objective.K={K}", f"data.batch_size={B}", *extra]


def steps_section(args) -> dict:
    """fp32/bf16/fp16 steps of every case: time, throughput, peak memory."""
    out = {}
    for case, name, K, B in STEP_CASES[args.dry_run]:
        for precision in PRECISIONS:
            key = f"{case}_{'fp32' if precision == 'no' else precision}"
            log(f"steps: {key}")
            out[key] = guarded(lambda: run_trainer(
                model_overrides(name, K, B, args.dry_run) + [precision_override(precision)],
                args, lambda t: t.timed(args.warmup, args.steps, efficiency=True)))
    out["ok"] = all(v.get("ok", False) for v in out.values())
    return out


def run_trainer(overrides: list[str], args, measure) -> dict:
    trainer = Trainer(overrides, args.dry_run)
    try:
        result = measure(trainer)
        if trainer.stand_in:
            result["scaler"] = "stand-in torch.amp.GradScaler('cpu')"
        return result
    finally:
        trainer.release()


def k_chunk_section(args) -> dict:
    """Peak memory of one step at K=1000 with k_chunk=50 (dry run: K=8, k_chunk=2), fp32."""
    K, C, B = (8, 2, 4) if args.dry_run else (1000, 50, 128)
    overrides = model_overrides("mnist_svhn", K, B, args.dry_run) + [f"objective.k_chunk={C}"]
    result = run_trainer(overrides, args, lambda t: t.timed(0, 1))
    return {"K": K, "k_chunk": C, "batch_size": B, **result}


def overflow_section(args) -> dict:
    """fp16: once the loss scale has settled, raise it 2^12-fold. The next step overflows: it
    must be skipped and lower the scale, and training must recover (a step taken, finite bound)
    within MAX_SETTLE steps, without an error."""
    overrides = model_overrides("mnist_svhn", 2, 4 if args.dry_run else 32, args.dry_run)

    def measure(trainer: Trainer) -> dict:
        scaler = trainer.acc.scaler
        if scaler is None:
            return {"ok": False, "error": "no GradScaler under fp16"}
        trainer.settle(1)
        forced = float(scaler.get_scale()) * 2.0**12
        scaler.update(new_scale=forced)
        first = trainer.step()
        scale_after = float(scaler.get_scale())
        recovered_after = guarded(lambda: trainer.settle(1))
        ok = (first["skipped"] and scale_after < forced and isinstance(recovered_after, int)
              and recovered_after < MAX_SETTLE)
        return {"ok": bool(ok), "forced_scale": forced, "first": first,
                "scale_after_overflow": scale_after, "skipped_before_recovery": recovered_after}

    return run_trainer(overrides + [precision_override("fp16")], args, measure)


def cuda_memory_section(args) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    gc.collect()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    return {"ok": allocated < 64 * 2**20, "allocated_mb": round(allocated / 2**20, 1),
            "reserved_mb": round(reserved / 2**20, 1),
            "max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


# --- DeepSpeed through accelerate launch (subprocesses) ----------------------------------------

DS_MISSING = [m for m in ("deepspeed", "webdataset", "sklearn")
              if importlib.util.find_spec(m) is None]


def deepspeed_section(args) -> dict:
    """ZeRO-2, one process: 4 steps straight; 2 steps then `--resume auto` to 4; same weights."""
    if DS_MISSING:
        return {"skipped": f"{', '.join(DS_MISSING)} not installed (carry the wheels, "
                           f"ENVIRONMENT.md 'GPU')"}
    from mmvae.data.recipes.digits import build_digits

    work = Path(tempfile.mkdtemp(prefix="gpu_check_ds_"))
    build_digits(work / "shards", pairs_per_instance=1, sources_per_class=4, train_shards=4,
                 test_shards=2, progress=False)
    out = {}
    for precision in ("no",) if args.dry_run else ("no", "bf16"):
        key = "fp32" if precision == "no" else precision
        log(f"deepspeed: {key}")
        out[key] = guarded(lambda: deepspeed_resume(work, precision, args))
    out["ok"] = all(v.get("ok", False) for v in out.values())
    return out


def deepspeed_resume(work: Path, precision: str, args) -> dict:
    straight, resumed = work / f"{precision}_straight", work / f"{precision}_resumed"
    runs = [("straight", straight, 4, []), ("first_2", resumed, 2, []),
            ("resume_to_4", resumed, 4, ["--resume", "auto"])]
    result = {}
    for name, run_dir, steps, extra in runs:
        proc = ds_train(work / "shards", run_dir, steps, precision, extra, args)
        result[name] = {"rc": proc.returncode}
        if proc.returncode != 0:
            return {"ok": False, **result, "error": error_line(proc.stderr)}
    want = torch.load(straight / "model" / "weights.pt", weights_only=True)
    got = torch.load(resumed / "model" / "weights.pt", weights_only=True)
    diff = max(float((got[k].float() - v.float()).abs().max()) for k, v in want.items())
    result["max_weight_diff"] = diff
    result["ok"] = diff <= 1e-5
    return result


def error_line(stderr: str) -> str:
    """The line of a failed run's stderr that names the error (else its last line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    named = [line for line in lines if ("Error" in line or line.startswith(("error:", "stopped:")))
             and "ChildFailedError" not in line]  # the launcher's, not the rank's error
    return ((named or lines or [""])[-1])[-500:]


def ds_train(shards: Path, run_dir: Path, steps: int, precision: str, extra: list[str], args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1",
           "--main_process_port", "0", str(ROOT / "launch" / "train.py"), *extra,
           "--config", str(ROOT / "configs" / "demo.yaml"), f"data.shards={shards}",
           "data.builtin=", f"run.dir={run_dir}", "logging.wandb=disabled",
           "logging.progress=false", "data.batch_size=4", "model.latent_dim=4", "objective.K=2",
           "train.test_batches=1", "train.log_every=1", "train.checkpoint_every=1",
           "train.epochs=20", f"train.max_steps={steps}", precision_override(precision)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    if args.dry_run:
        env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=args.subprocess_timeout)


# --- running the sections ----------------------------------------------------------------------

def guarded(fn) -> dict:
    """fn()'s result, or {"ok": False, "error": ...} if it raised: one section's failure is
    reported and the others still run."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - the check reports every failure in its summary
        return {"ok": False, "error": f"{type(err).__name__}: {str(err)[:500]}"}


SECTIONS = {"steps": steps_section, "k_chunk_memory": k_chunk_section,
            "fp16_overflow": overflow_section, "deepspeed": deepspeed_section,
            "cuda_memory_after": cuda_memory_section}


def environment() -> dict:
    import accelerate

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "accelerate": accelerate.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "missing_for_deepspeed": DS_MISSING}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU: checks the script itself, not the GPU")
    p.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (5; dry run 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (2; dry run 1)")
    p.add_argument("--budget-s", type=float, default=450,
                   help="sections not started by then are skipped (default 450 s)")
    p.add_argument("--subprocess-timeout", type=float, default=240)
    args = p.parse_args(argv)
    args.steps = args.steps or (1 if args.dry_run else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 2)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    t0, sections = time.perf_counter(), {}
    for name in args.only or SECTIONS:
        if time.perf_counter() - t0 > args.budget_s:
            sections[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        log(f"{name} ...")
        start = time.perf_counter()
        sections[name] = guarded(lambda: SECTIONS[name](args))
        sections[name]["seconds"] = round(time.perf_counter() - start, 1)
    ran = [s for s in sections.values() if "skipped" not in s]
    summary = {"ok": all(s.get("ok", False) for s in ran), "dry_run": args.dry_run,
               "seconds": round(time.perf_counter() - t0, 1), "environment": environment(),
               "sections": sections}
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
