"""scripts/gpu_check.sh --dry-run: the GPU check's own code at tiny sizes on the CPU, so that the
script is known to run before a GPU is had. Its summary is one JSON line on stdout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {"steps", "k_chunk_memory", "fp16_overflow", "deepspeed", "cuda_memory_after"}

pytestmark = pytest.mark.slow  # ~1 minute of steps plus three DeepSpeed launches (~3 min here)


@pytest.fixture(scope="module")
def dry_run():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(MMVAE_PYTHON=sys.executable, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"one JSON line on stdout:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    summary = json.loads(lines[0])
    assert proc.returncode == (0 if summary["ok"] else 1)
    return summary


def test_dry_run_reports_every_section_and_the_cpu_paths_pass(dry_run):
    assert dry_run["dry_run"] is True and set(dry_run["sections"]) == SECTIONS
    steps = dry_run["sections"]["steps"]
    assert not any(name.startswith("mnist_svhn_B512") for name in steps)  # full size only
    for case in ("mnist_svhn_B128", "cubIS_B64"):
        for precision in ("fp32", "bf16"):
            result = steps[f"{case}_{precision}"]
            assert result["ok"], (case, precision, result)
            assert result["samples_per_s"] > 0 and result["peak_mem_mb"] > 0
            assert result["bound"] < 0  # a log-likelihood bound of random data
            # efficiency against the matmul peak of the precision in use, as benchmarks/bench.py
            assert result["gflop_per_step"] > 0 and result["peak_gflops"] > 0
            assert result["peak_matmul"].endswith({"fp32": "float32", "bf16": "bfloat16"}[precision])
            assert result["efficiency"] == pytest.approx(
                result["achieved_gflops"] / result["peak_gflops"], abs=1e-3)
        assert "ok" in steps[f"{case}_fp16"]  # ran and reported, passed or not
    chunk = dry_run["sections"]["k_chunk_memory"]
    assert chunk["ok"] and chunk["k_chunk"] < chunk["K"]
    assert dry_run["sections"]["cuda_memory_after"]["skipped"] == "no CUDA device"
    for name in ("fp16_overflow", "deepspeed"):  # each reports its own success or failure
        section = dry_run["sections"][name]
        assert section["ok"] or "error" in json.dumps(section), (name, section)


def test_dry_run_passes_every_section(dry_run):
    failed = {name: s for name, s in dry_run["sections"].items()
              if "skipped" not in s and not s.get("ok")}
    assert dry_run["ok"] and not failed, failed
