"""launch/evaluate.py under `accelerate launch` with 2 CPU processes gives the numbers of 1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmvae
from mmvae.config import load_config, save_config
from mmvae.eval.distributed import Ranks, batch_seed
from mmvae.eval.run import evaluate_run

ROOT = Path(__file__).resolve().parents[2]
EVALUATE = ROOT / "launch" / "evaluate.py"


def clean_env():
    """No rank variables leak from the test process; W&B off; one thread as torchrun sets."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def evaluate_two_processes(run_dir, metrics, overrides) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", str(EVALUATE), "--run", str(run_dir), "--metrics",
           ",".join(metrics), *overrides]
    proc = subprocess.run(cmd, env=clean_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((Path(run_dir) / "eval.json").read_text()), proc.stdout


def make_run(run_dir, model, overrides):
    run_dir.mkdir(parents=True)
    save_config(load_config(None, overrides + ["logging.progress=false"]), run_dir / "config.yaml")
    mmvae.save_model(model, run_dir / "model")
    return run_dir


def one_process(run_dir, metrics, overrides) -> dict:
    """The reference, in this process (one torch thread, as each torchrun process has)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate_run(run_dir, metrics, overrides)
    finally:
        torch.set_num_threads(before)


TOY = ["eval.iwae_K=100", "eval.toy_datapoints=300", "eval.likelihood_batch=32",
       "eval.embedding=pca", "eval.plot_batch=50"]


def test_toy_likelihood_two_processes_equal_one(tmp_path, gaussian_pair):
    run = make_run(tmp_path / "toy", gaussian_pair,
                   ["model.name=gaussian_pair", "model.latent_dim=2", "model.data_dim=3",
                    "train.seed=7"])
    two, stdout = evaluate_two_processes(run, ["likelihood", "pictures"], TOY)
    assert stdout.count("report:") == 1  # only the main process prints (and writes)
    assert two["metrics"]["pictures"]["files"]  # main-only metrics ran on the main process
    one = one_process(run, ["likelihood"], TOY)
    assert two["metrics"]["likelihood"] == one["metrics"]["likelihood"]  # bit for bit
    assert one["metrics"]["likelihood"]["num_datapoints"] == 300  # 10 batches, 5 per rank


DIGITS = ["eval.iwae_K=8", "eval.k_chunk=4", "eval.likelihood_batch=16", "eval.max_datapoints=100",
          "eval.batch_size=32", "eval.classifier_epochs=1", "eval.coherence_samples=2500",
          "eval.embedding=pca", "eval.plot_batch=32"]


def test_digits_two_processes_equal_one(tmp_path):
    """Likelihood from the shard stream (100 of 160 test pairs, 7 batches: the ranks get 4 and
    3), cross coherence on the 80 unique pairs (3 batches), joint coherence (3 chunks of prior
    samples), the subset metrics (M = 2: conditional coherence equals cross coherence); the
    classifiers are trained by the main process while the other waits, then loaded by both."""
    from mmvae.data import build_digits

    shards = tmp_path / "digits"
    build_digits(shards, pairs_per_instance=2, train_shards=2, test_shards=2,
                 sources_per_class=40, progress=False)
    torch.manual_seed(0)
    run = make_run(tmp_path / "run", mmvae.build_model("mnist_svhn", latent_dim=4),
                   ["model.name=mnist_svhn", "model.latent_dim=4", f"data.shards={shards}"])
    metrics = ["likelihood", "coherence", "latent", "subset_coherence", "subset_latent", "pictures"]
    two, _ = evaluate_two_processes(run, metrics, DIGITS)
    assert (shards / "classifiers" / "mnist.pt").is_file()
    sharded = ["likelihood", "coherence", "subset_coherence", "subset_latent"]
    one = one_process(run, sharded, DIGITS)
    for name in sharded:
        assert two["metrics"][name] == one["metrics"][name], name
    cross, cond = (two["metrics"][m]["values"] for m in ("coherence", "subset_coherence"))
    assert cond["cond_svhn_to_mnist"] == cross["cross_svhn_to_mnist"]  # M = 2: the same draws
    assert cond["cond_mnist_to_svhn"] == cross["cross_mnist_to_svhn"]
    assert two["metrics"]["likelihood"]["num_datapoints"] == 100
    assert two["metrics"]["coherence"]["num_pairs"] == 80
    assert two["metrics"]["coherence"]["joint_samples"] == 2500
    assert set(two["metrics"]) == set(metrics)


def _probe(seed: int) -> torch.nn.Module:
    """A random linear classifier of 28x28 images whose weights sum to zero per class: blind to
    the untrained decoders' common grey, its prediction follows every change of z."""
    w = torch.randn(10, 784, generator=torch.Generator().manual_seed(seed))
    linear = torch.nn.Linear(784, 10, bias=False)
    linear.weight.data = w - w.mean(1, keepdim=True)
    return torch.nn.Sequential(torch.nn.Flatten(), linear).eval()


def _subset_metrics(ranks: Ranks, seed: int = 3) -> dict:
    """Conditional and joint coherence and latent accuracy per subset of an untrained
    three-modality MMVAE with random classifiers (scores that depend on every draw), on 5
    batches of 40 (ranks get 3 and 2) and 7 prior chunks."""
    from mmvae.eval.coherence import array_batches, joint_coherence
    from mmvae.eval.conditional import conditional_coherence
    from mmvae.eval.latent import subset_latent_accuracy
    from standins import digit_mmvae

    torch.set_num_threads(1)
    model = digit_mmvae(3)
    classifiers = {m: _probe(i) for i, m in enumerate(model.modalities)}
    g = torch.Generator().manual_seed(2)
    xs, labels = [torch.rand(200, 1, 28, 28, generator=g) for _ in range(3)], torch.arange(200) % 10

    def batches():
        return array_batches(xs, labels, 40)

    return {"cond": conditional_coherence(model, batches(), classifiers, seed=seed, ranks=ranks),
            "joint": joint_coherence(model, classifiers, num_samples=650, batch_size=100,
                                     seed=seed, ranks=ranks),
            "latent": subset_latent_accuracy(model, batches(), batches(), seed=seed, ranks=ranks)}


def _subset_worker(rank: int, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous",
                                         rank=rank, world_size=2)
    try:
        torch.save(_subset_metrics(Ranks(rank, 2)), f"{folder}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_subset_metrics_of_three_modalities_two_processes_equal_one(tmp_path):
    """Two gloo processes, each computing its round-robin share of the batches (and of the
    subsets' linear probes), gather the numbers of one process, on both ranks."""
    torch.multiprocessing.spawn(_subset_worker, args=(str(tmp_path),), nprocs=2)
    one = _subset_metrics(Ranks())
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == one, rank
    assert len(one["cond"]["values"]) == 9 + 2 and one["cond"]["num_pairs"] == 200
    assert len(one["latent"]["values"]) == 7 + 3
    other = _subset_metrics(Ranks(), seed=4)  # the draws matter: parity is not a coincidence
    assert other["cond"] != one["cond"] and other["joint"] != one["joint"]


def test_ranks_split_batches_round_robin():
    ranks = [Ranks(r, 3) for r in range(3)]
    owned = [[i for i, _ in r.mine("abcdefg")] for r in ranks]
    assert owned == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(owned, [])) == list(range(7))
    assert Ranks().gather_by_index({2: "c", 0: "a", 1: "b"}) == ["a", "b", "c"]
    assert len({batch_seed(0, i, s) for i in range(100) for s in range(3)}) == 300
    with pytest.raises(ValueError):
        Ranks(2, 2)


def test_cubISft_cca_and_likelihood_two_processes_equal_one(tmp_path):
    """The real cubISft on tiny caption shards (2048-d features, 32-token captions): the main
    process fits the CCA space (default FastText) while the other waits; the CCA coherence and
    the likelihood then equal one process's. (600 train pairs of 2048-d features overfit the
    CCA, so the scores themselves are ~0: this test is about parity.)"""
    from test_cca import ITOS, synthetic_pairs, synthetic_vocab, write_caption_shards

    train, test = synthetic_pairs(600, 1, dim=2048, length=32), synthetic_pairs(90, 2, dim=2048, length=32)
    shards = tmp_path / "shards"
    write_caption_shards(shards, train, test, synthetic_vocab(train[1]))
    torch.manual_seed(0)
    model = mmvae.build_model("cubISft", latent_dim=4, vocab_size=len(ITOS))
    run = make_run(tmp_path / "run", model, ["model.name=cubISft", "model.latent_dim=4",
                                             f"model.vocab_size={len(ITOS)}", f"data.shards={shards}"])
    overrides = ["eval.iwae_K=6", "eval.k_chunk=3", "eval.likelihood_batch=16", "eval.batch_size=32"]
    two, _ = evaluate_two_processes(run, ["likelihood", "cca"], overrides)
    assert not two["metrics"]["cca"]["artifacts"]["loaded"]  # fitted by the main process
    one = one_process(run, ["likelihood", "cca"], overrides)
    assert one["metrics"]["cca"]["artifacts"]["loaded"]
    for name in ("likelihood", "cca"):
        assert {k: v for k, v in two["metrics"][name].items() if k != "artifacts"} == \
            {k: v for k, v in one["metrics"][name].items() if k != "artifacts"}, name
    assert two["metrics"]["cca"]["num_pairs"] == 90 and two["metrics"]["likelihood"]["num_datapoints"] == 90


def test_shapes_attributes_two_processes_equal_one(make_shapes_run):
    """cubIS on tiny shapes_simple shards: 40 test scenes in 5 batches of 8 (ranks get 3 and 2)
    and 20 prior samples in 3 chunks; the colour/shape classifiers are trained by the main
    process while the other waits."""
    run, shards = make_shapes_run(test_scenes=40)
    overrides = ["eval.batch_size=8", "eval.coherence_samples=20", "eval.classifier_epochs=1"]
    two, _ = evaluate_two_processes(run, ["attributes"], overrides)
    assert (shards / "classifiers" / "image-colour.pt").is_file()
    one = one_process(run, ["attributes"], overrides)
    assert two["metrics"]["attributes"] == one["metrics"]["attributes"]
    assert two["metrics"]["attributes"]["num_scenes"] == 40
