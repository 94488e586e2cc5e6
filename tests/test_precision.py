"""train.mixed_precision=auto: bf16 where the hardware has native bf16, fp32 (no) elsewhere."""
import pytest

from mmvae.config import load_config
from mmvae.train import precision


@pytest.mark.parametrize("device, flags, cuda_bf16, expected", [
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, False, "bf16"),  # e.g. AMD EPYC Zen 4
    ("cpu", {"avx512f", "amx_tile", "amx_bf16"}, False, "bf16"),  # Intel Sapphire Rapids (AMX)
    ("cpu", {"avx2", "avx512f", "avx512_vnni"}, False, "no"),     # emulated bf16: slower
    ("cpu", set(), False, "no"),
    ("cuda", set(), True, "bf16"),                                # Ampere and later
    ("cuda", {"avx512_bf16"}, False, "no"),                       # the CPU does not matter
])
def test_auto_picks_bf16_only_where_bf16_is_native(device, flags, cuda_bf16, expected):
    choice, reason = precision.choose_precision(device, flags, cuda_bf16)
    assert choice == expected
    assert reason  # the start message says why


def test_auto_is_replaced_in_the_config_and_announced_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    cfg = load_config(None, ["train.mixed_precision=auto"])
    assert precision.resolve_precision(cfg, "cpu") == "bf16"
    assert cfg.train.mixed_precision == "bf16"  # what config.yaml and W&B then record
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["train.mixed_precision=auto -> bf16 (the CPU has avx512_bf16)"]

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    cfg = load_config(None, ["train.mixed_precision=auto"])
    assert precision.resolve_precision(cfg, "cpu") == "no"
    assert "auto -> no" in capsys.readouterr().err


def test_explicit_precisions_are_kept_without_a_message(capsys):
    for value in ("'no'", "bf16", "fp16"):  # quoted: YAML 1.1 reads a bare no as False
        cfg = load_config(None, [f"train.mixed_precision={value}"])
        value = value.strip("'")
        assert precision.resolve_precision(cfg, "cpu") == value
    assert capsys.readouterr().err == ""


def test_the_accelerator_runs_the_precision_auto_stands_for(monkeypatch):
    from accelerate.state import AcceleratorState

    from mmvae.train.dist import make_accelerator

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    cfg = load_config(None, ["train.mixed_precision=auto", "logging.wandb=disabled"])
    try:
        acc = make_accelerator(cfg)
        assert cfg.train.mixed_precision == "bf16" and acc.mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
