"""mmvae.perf and the benchmarks' efficiency fields: FLOP counting, matmul peak, efficiency."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mmvae import perf

ROOT = Path(__file__).resolve().parent.parent


def test_flop_count_of_a_conv_and_linear_step_equals_the_analytic_count():
    B, C, H, W, k, D = 3, 4, 8, 8, 3, 5
    net = nn.Sequential(nn.Conv2d(1, C, k, padding=1), nn.Flatten(), nn.Linear(C * H * W, D))
    x = torch.randn(B, 1, H, W)  # data: no gradient w.r.t. the input of the convolution
    conv = 2 * B * C * H * W * 1 * k * k  # multiply-adds of the forward convolution
    linear = 2 * B * (C * H * W) * D
    # backward: the conv needs only its weight gradient (1 x forward), the linear layer its
    # weight gradient and the gradient of its input (2 x forward); biases are not matmul FLOP.
    expected = conv + linear + conv + 2 * linear
    assert perf.count_flops(lambda: net(x).sum().backward()) == expected
    with torch.no_grad():
        assert perf.count_flops(lambda: net(x)) == conv + linear


def test_matmul_peak_is_timed_in_the_requested_dtype_with_the_current_threads():
    peak = perf.matmul_peak(torch.float32, max_n=256, repeats=2)
    assert peak.n == 256 and peak.dtype == torch.float32
    assert peak.threads == torch.get_num_threads()
    assert 1e6 < peak.flops_per_s < 1e15  # a real timing, not a constant


def test_efficiency_is_achieved_flops_over_the_peak():
    peak = perf.Peak(flops_per_s=100e9, n=2048, dtype=torch.bfloat16, threads=1)
    record = perf.efficiency(flops=30e9, seconds=2.0, peak=peak)
    assert record["achieved_gflops"] == 15.0 and record["peak_gflops"] == 100.0
    assert record["efficiency"] == 0.15 and record["peak_matmul"] == "2048^3 bfloat16"


def test_profile_table_lists_the_operators_of_the_call():
    a = torch.randn(64, 64)
    table = perf.profile_table(lambda: a @ a, top=5)
    assert "aten::mm" in table


def _bench_main():
    spec = importlib.util.spec_from_file_location("bench_entry", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def fresh_accelerator_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_bench_json_line_has_the_step_flop_the_peak_and_their_ratio(capsys):
    main = _bench_main()
    assert main(["--steps", "1", "--warmup", "0", "objective.K=2", "data.batch_size=4",
                 "model.latent_dim=4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert result["precision"] == "no" and result["peak_matmul"].endswith("float32")
    assert result["peak_threads"] == result["threads"]
    # mnist_svhn at K=2, B=4: the convolutions alone are well above 10 MFLOP, below 100 GFLOP
    assert 0.01 < result["gflop_per_step"] < 100
    achieved = result["gflop_per_step"] / result["step_s"]
    assert result["achieved_gflops"] == pytest.approx(achieved, rel=0.05)
    assert result["efficiency"] == pytest.approx(achieved / result["peak_gflops"], rel=0.05)
    assert 0 < result["efficiency"] < 1


def test_compiled_nets_give_the_eager_values_and_gradients_and_keep_parameter_names():
    import copy

    import mmvae
    from mmvae import objectives
    from mmvae.train.compiled import compile_nets

    torch.manual_seed(0)
    eager = mmvae.build_model("gaussian_pair", latent_dim=2, data_dim=3)
    compiled = compile_nets(copy.deepcopy(eager))
    assert all(e.enc._compiled_call_impl is not None and e.dec._compiled_call_impl is not None
               for e in compiled.experts)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    B, K = 5, 4
    xs = [torch.randn(B, 3), torch.randn(B, 3)]
    estimator = objectives.select("dreg", True, looser=True)

    def step(model):
        eps = model.sample_noise(K, B, generator=torch.Generator().manual_seed(1))
        value = estimator(model, xs, K, eps=eps)
        value.mean().backward()
        return value.detach(), [p.grad for p in model.parameters()]

    value, grads = step(eager)
    value_c, grads_c = step(compiled)
    torch.testing.assert_close(value_c, value)
    for g_c, g in zip(grads_c, grads):
        assert (g_c is None) == (g is None)
        if g is not None:
            torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-6)  # fused ops reorder sums
