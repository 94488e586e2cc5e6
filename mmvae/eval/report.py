"""The one-page ``report.md`` of an evaluation and the metrics table it shares with the CLI.

Rows come from every metric's ``values``; the paper's MMVAE numbers (Shi et al. 2019, as quoted
in REFERENCE.md §7) stand beside them only when model and dataset are the paper's: the built-in
``digits`` and ``shapes`` look-alikes are not comparable.
"""
from __future__ import annotations

from pathlib import Path

REPORT = "report.md"
MNIST_SVHN_DATASETS = ("mnist_svhn", "mnist-svhn")
CUB_DATASETS = ("cub",)
# model -> (datasets, {(metric, value key): the paper's number}). Direction: "cross_svhn_to_mnist"
# decodes MNIST from the SVHN encoder and classifies it with the MNIST net (Table 2). CUB: the
# CCA joint coherence of Table 4 (the other CUB numbers of REFERENCE.md are unverified).
PAPER_BY_MODEL = {
    "mnist_svhn": (MNIST_SVHN_DATASETS, {("coherence", "cross_svhn_to_mnist"): 0.864,
                                         ("coherence", "cross_mnist_to_svhn"): 0.691,
                                         ("coherence", "joint"): 0.421}),
    "cubISft": (CUB_DATASETS, {("cca", "joint"): 0.263}),
}
PERCENT_METRICS = ("coherence", "latent", "subset_coherence", "subset_latent", "attributes")
DETAILS = {  # what each metric's one-line note shows
    "likelihood": ("K", "k_chunk", "num_datapoints", "seed", "llik_scaling"),
    "coherence": ("test_pairs", "num_pairs", "joint_samples", "seed"),
    "latent": ("data", "num_train", "num_test", "seed"),
    "subset_coherence": ("test_pairs", "num_pairs", "joint_samples", "seed"),
    "subset_latent": ("data", "num_train", "num_test", "seed"),
    "pictures": ("embedding_method", "embedding_points", "mean_kl"),
    "cca": ("test_pairs", "num_pairs", "joint_samples", "seed", "artifacts"),
    "attributes": ("test_pairs", "num_scenes", "joint_samples", "seed"),
}


def paper_numbers(payload: dict) -> dict:
    """{(metric, key): number} of the paper for this payload's model and dataset (or {})."""
    datasets, numbers = PAPER_BY_MODEL.get(payload.get("model"), ((), {}))
    return numbers if payload.get("dataset") in datasets else {}


def paper_applies(payload: dict) -> bool:
    return bool(paper_numbers(payload))


def _format(metric: str, value) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if metric in PERCENT_METRICS:
        return f"{100 * value:.1f}%"
    return f"{value:.3f}" if metric == "cca" else f"{value:.2f}"


def metrics_rows(payload: dict) -> list[tuple[str, str, str]]:
    """(name, value, paper) strings for every value of every metric, in computation order."""
    return [(f"{metric} / {key}", value, paper) for metric, key, value, paper in _rows(payload)]


def _rows(payload: dict) -> list[tuple[str, str, str, str]]:
    """Every value of every metric, or only its ``headline`` keys where it names them (the
    subset metrics: their per-subset values go to `subset_table`)."""
    paper = paper_numbers(payload)
    rows = []
    for metric, result in payload["metrics"].items():
        values = (result or {}).get("values", {})
        for key in (result or {}).get("headline", values):
            value, number = values[key], paper.get((metric, key))
            rows.append((metric, key, _format(metric, value),
                         "" if number is None else _format(metric, number)))
    return rows


def metrics_table(payload: dict):
    """A compact rich Table for the terminal: one section per metric, the metric's settings
    under its name (likelihood: K and datapoints), the paper's numbers where they apply."""
    from rich.table import Table

    paper = bool(paper_numbers(payload))
    table = Table(title=f"{payload['model']} on {payload['dataset']} ({payload.get('seconds')} s)",
                  title_justify="left")
    for name, justify in (("metric", "left"), ("value key", "left"), ("value", "right"),
                          ("paper", "right"))[: 4 if paper else 3]:
        table.add_column(name, justify=justify)
    groups: dict[str, list] = {}
    for metric, key, value, number in _rows(payload):
        groups.setdefault(metric, []).append((key, value, number))
    for metric, rows in groups.items():
        labels = [f"[bold]{metric}[/bold]", _subtitle(metric, payload["metrics"][metric])]
        for i, (key, value, number) in enumerate(rows):
            label = labels[i] if i < len(labels) else ""
            table.add_row(label, key, value, *([number] if paper else []),
                          end_section=i == len(rows) - 1)
    return table


def _subtitle(metric: str, result: dict) -> str:
    """The settings line under a metric's name in the terminal table."""
    if metric == "likelihood":
        return f"[dim]K={result.get('K')}, N={result.get('num_datapoints')}[/dim]"
    if metric in ("coherence", "cca") and "num_pairs" in result:
        return f"[dim]{result['num_pairs']} pairs[/dim]"
    return ""


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


SUBSET_TABLES = {  # metric -> (section title, what "per subset" shows)
    "subset_coherence": ("Coherence by number of given modalities",
                         "per subset S (mean over the modalities left out of S)"),
    "subset_latent": ("Latent accuracy by number of given modalities", "per subset S"),
}


def subset_table(metric: str, result: dict) -> list[str]:
    """The markdown lines of a subset metric's compact table: one row per number of given
    modalities, its mean and each subset's score (joint coherence as the last row)."""
    title, per = SUBSET_TABLES[metric]
    lines = [f"### {title}", "", f"| given | mean | {per} |", "|---:|---:|---|"]
    for k, size in result.get("by_size", {}).items():
        subsets = ", ".join(f"{name} {_format(metric, acc)}"
                            for name, acc in size["subsets"].items())
        lines.append(f"| {k} | {_format(metric, size['mean'])} | {subsets} |")
    joint = result.get("values", {}).get("joint")
    if joint is not None:
        lines.append(f"| none (prior samples, all agree) | {_format(metric, joint)} | |")
    return lines + [""]


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
                     "MNIST→SVHN, joint 42.1%; CUB cubISft: CCA joint coherence 0.263) are shown "
                     "only for the paper's model on the real dataset.")
    if "likelihood" in payload["metrics"]:
        lines.append("Likelihoods are nats per datapoint: `joint_with_lambda` is the paper's "
                     "scaled m_iwae; `x_d_from_e` uses encoder e's posterior as the proposal.")
    if "cca" in payload["metrics"]:
        lines.append("CCA coherence: mean cosine of (image feature, caption) pairs in a CCA space "
                     "(k=40) fitted on the train pairs; `cross_feature_to_caption` decodes the "
                     "caption from the feature encoder. Absolute values depend on the FastText "
                     "and CCA draw (artifacts saved with the shards).")
    subset_metrics = [m for m in SUBSET_TABLES if m in payload["metrics"]]
    if subset_metrics:
        lines += ["", "## Subsets of modalities", "",
                  "Conditional coherence S → m: a z drawn given the modalities S, decoded into "
                  "each modality m outside S and classified; latent accuracy: a linear probe on "
                  "the latent mean given S. Every value is in eval.json (`cond_<S>_to_<m>`, "
                  "`latent_<S>`).", ""]
        for metric in subset_metrics:
            lines += subset_table(metric, payload["metrics"][metric])
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
