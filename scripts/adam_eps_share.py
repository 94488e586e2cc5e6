"""How much Adam's eps shapes the update at a checkpoint: ours (mean over the batch) against the
paper code's (sum over the batch, i.e. eps / B in our units). docs/estimators.md, issue 18.

`python scripts/adam_eps_share.py RUN_DIR/checkpoints/<step> [--batch 128]` prints, per parameter
group, the median of the update's denominator core sqrt(v_hat) (amsgrad's max, bias-corrected)
and, among the elements that ever had a gradient, the share where eps changes the step by more
than 1% (eps / (core + eps) > 0.01).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    ckpt = Path(args.checkpoint)
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    from mmvae import build_model

    spec = dict(json.loads((ckpt / "meta.json").read_text())["model"])
    model = build_model(spec.pop("name"), **spec)  # the optimiser's parameter order
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    group = opt["param_groups"][0]
    eps, (_, beta2) = group["eps"], group["betas"]
    named = dict(zip(group["params"], names))
    rows: dict[str, list[torch.Tensor]] = {}
    for idx, st in opt["state"].items():
        step = float(st["step"])
        core = st["max_exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5
        name = named[idx]
        key = "prior" if "prior_raw" in name else ".".join(name.split(".")[:3])
        rows.setdefault(key, []).append(core.reshape(-1))
    print(f"step {step:.0f}, eps {eps:g} (ours) vs {eps / args.batch:.3g} (paper code in our units)")
    print(f"{'group':<16}{'elements':>10}{'never a gradient':>18}{'median core':>13}"
          f"{'>1% ours':>10}{'>1% paper':>11}")
    for key, parts in rows.items():
        core = torch.cat(parts).double()
        zero = core == 0  # no gradient ever (e.g. weights of always-black pixels): no update at all
        live = core[~zero]
        share = [float(((e / (live + e)) > 0.01).double().mean()) for e in (eps, eps / args.batch)]
        print(f"{key:<16}{core.numel():>10}{float(zero.double().mean()):>18.4f}"
              f"{float(live.median()):>13.3g}{share[0]:>10.4f}{share[1]:>11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
