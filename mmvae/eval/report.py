"""The one-page ``report.md`` of an evaluation and the metrics table it shares with the CLI.

Rows come from every metric's ``values``; the paper's MMVAE numbers (Shi et al. 2019, Table 2,
as quoted in REFERENCE.md §7) stand beside them only when the dataset is the real MNIST-SVHN:
the built-in ``digits`` look-alike is not comparable.
"""
from __future__ import annotations

from pathlib import Path

REPORT = "report.md"
MNIST_SVHN_DATASETS = ("mnist_svhn", "mnist-svhn")
# (metric, value key) -> the paper's number. Direction: "cross_svhn_to_mnist" decodes MNIST from
# the SVHN encoder and classifies it with the MNIST net.
PAPER = {
    ("coherence", "cross_svhn_to_mnist"): 0.864,
    ("coherence", "cross_mnist_to_svhn"): 0.691,
    ("coherence", "joint"): 0.421,
}
PERCENT_METRICS = ("coherence", "latent")
DETAILS = {  # what each metric's one-line note shows
    "likelihood": ("K", "k_chunk", "num_datapoints", "seed", "llik_scaling"),
    "coherence": ("test_pairs", "num_pairs", "joint_samples", "seed"),
    "latent": ("data", "num_train", "num_test", "seed"),
    "pictures": ("embedding_method", "embedding_points", "mean_kl"),
}


def paper_applies(payload: dict) -> bool:
    return payload.get("dataset") in MNIST_SVHN_DATASETS and payload.get("model") == "mnist_svhn"


def _format(metric: str, value) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    return f"{100 * value:.1f}%" if metric in PERCENT_METRICS else f"{value:.2f}"


def metrics_rows(payload: dict) -> list[tuple[str, str, str]]:
    """(name, value, paper) strings for every value of every metric, in computation order."""
    with_paper = paper_applies(payload)
    rows = []
    for metric, result in payload["metrics"].items():
        for key, value in result.get("values", {}).items():
            paper = PAPER.get((metric, key))
            rows.append((f"{metric} / {key}", _format(metric, value),
                         _format(metric, paper) if with_paper and paper is not None else ""))
    return rows


def _short(value):
    """Floats (also inside dicts and lists) to 4 significant digits for the details lines."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value


def _details(metric: str, result: dict) -> str:
    items = [f"{k}={_short(result[k])}" for k in DETAILS.get(metric, ()) if k in result]
    return f"- **{metric}**: " + ", ".join(items) if items else ""


def render_report(payload: dict) -> str:
    """The markdown text of report.md."""
    lines = [f"# Evaluation: {Path(payload['run_dir']).name}", "",
             f"model `{payload['model']}` ({', '.join(payload.get('modalities', []))}), "
             f"dataset `{payload.get('dataset')}`, seed {payload.get('seed')}, "
             f"device {payload.get('device')}, {payload.get('seconds')} s", "",
             "## Metrics", "",
             "| metric | value | paper (MMVAE) |", "|---|---:|---:|"]
    rows = metrics_rows(payload)
    lines += [f"| {n} | {v} | {p} |" for n, v, p in rows] or ["| (no values) | | |"]
    lines.append("")
    if not paper_applies(payload):
        lines.append("Paper numbers (MNIST-SVHN: cross coherence 86.4% SVHN→MNIST, 69.1% "
                     "MNIST→SVHN, joint 42.1%) are shown only for the real MNIST-SVHN dataset.")
    lines.append("Likelihoods are nats per datapoint: `joint_with_lambda` is the paper's "
                 "scaled m_iwae; `x_d_from_e` uses encoder e's posterior as the proposal.")
    lines += ["", "## Details", ""]
    lines += [d for d in (_details(m, r) for m, r in payload["metrics"].items()) if d]
    files = [f for f in payload["metrics"].get("pictures", {}).get("files", []) if f.endswith(".png")]
    if files:
        lines += ["", "## Pictures", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in files]
    return "\n".join(lines) + "\n"


def write_report(run_dir, payload: dict) -> Path:
    """Write ``run_dir/report.md``; picture links are relative to run_dir."""
    path = Path(run_dir) / REPORT
    path.write_text(render_report(payload))
    return path
