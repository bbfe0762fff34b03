#!/usr/bin/env python3
"""Side-by-side load benchmark: torch.load vs tlens on the same full-size TL demo file.

    python benches/pytorch_anchor.py            # make bench-data/demo_full.pth if missing, time both

The file has the TL grokking demo's exact structure and sizes (p=113 model, 250 checkpoints,
25,000 train and test losses, train/test indices), written by torch.save; weights are random
perturbations (content does not affect load time). tlens is timed by its criterion bench
(`cargo bench --bench load`), whose median estimates are read back from target/criterion.
Versions: see fixtures/requirements.txt (torch 2.15.0, transformer-lens 2.18.0).
"""
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "bench-data", "demo_full.pth")
torch.set_num_threads(2)


def make():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, n_heads=4, d_model=128, d_head=32, d_mlp=512, act_fn="relu",
                                  normalization_type=None, d_vocab=114, d_vocab_out=113, n_ctx=3,
                                  init_weights=True, device="cpu", seed=999)
    model = HookedTransformer(cfg)
    ckpts = []
    for i in range(250):
        sd = copy.deepcopy(model.state_dict())
        for k, v in sd.items():
            if v.dtype == torch.float32 and v.dim() > 0:
                v.add_(torch.randn_like(v) * 1e-3)
        ckpts.append(sd)
    torch.manual_seed(598)
    idx = torch.randperm(113 * 113)
    g = torch.Generator().manual_seed(0)
    obj = {
        "model": model.state_dict(), "config": model.cfg, "checkpoints": ckpts,
        "checkpoint_epochs": [100 * i + 99 for i in range(250)],
        "test_losses": torch.rand(25000, generator=g, dtype=torch.float64).tolist(),
        "train_losses": torch.rand(25000, generator=g, dtype=torch.float64).tolist(),
        "train_indices": idx[:3830], "test_indices": idx[3830:],
    }
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    torch.save(obj, PATH)


def timeit(f, n):
    f()  # warm the page cache
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def criterion_median(name):
    p = os.path.join(ROOT, "target", "criterion", "load", name, "new", "estimates.json")
    return json.load(open(p))["median"]["point_estimate"] / 1e9


def main():
    if not os.path.exists(PATH):
        print("making", PATH)
        make()
    import transformer_lens  # noqa: F401  (the config object needs TL importable)

    size = os.path.getsize(PATH) / 1e6
    full = timeit(lambda: torch.load(PATH, weights_only=False), 7)
    lazy = timeit(lambda: torch.load(PATH, weights_only=False, mmap=True), 7)
    one = timeit(lambda: torch.load(PATH, weights_only=False, mmap=True)["checkpoints"][125]["embed.W_E"].sum(), 7)
    subprocess.run(["cargo", "bench", "--bench", "load"], cwd=ROOT, check=True,
                   env=dict(os.environ, TLENS_BENCH_FILE=PATH), stdout=subprocess.DEVNULL)
    t_full, t_lazy, t_one = (criterion_median(n) for n in ["full_read", "open_lazy", "open_and_one_checkpoint"])
    print(f"file: {PATH} ({size:.0f} MB, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"{'':34}{'torch':>10}{'tlens':>10}{'ratio':>8}")
    print(f"{'full read':34}{full*1e3:9.1f}ms{t_full*1e3:9.1f}ms{full/t_full:7.1f}x")
    print(f"{'lazy open (torch: mmap=True)':34}{lazy*1e3:9.1f}ms{t_lazy*1e3:9.1f}ms{lazy/t_lazy:7.1f}x")
    print(f"{'open + one checkpoint':34}{one*1e3:9.1f}ms{t_one*1e3:9.1f}ms{one/t_one:7.1f}x")


if __name__ == "__main__":
    sys.exit(main())
