"""ms per training step of the `shapes` recipe under its training options,
measured side by side: the previous recipe's frozen stem/layer1, this recipe's
from-scratch backbone without a training-only branch, and that with --hybrid
and with --denoise (this recipe). Each configuration runs the same
batches (batch 8, the recipe's training scale), interleaved, first step of each
round untimed.

    python scripts/bench_train_options.py [ROUNDS]      # DDETR_CACHE picks the dataset folder
"""

from __future__ import annotations

import sys
import time

import torch

from ddetr_cli.data import collate, load_dataset_config
from ddetr_cli.engine.config import resolve
from ddetr_cli.engine.loops.step import build_criterion, build_train_module, train_step
from ddetr_cli.engine.parts.optim import build_optimizer
from ddetr_cli.engine.runs.assemble import build_datasets, build_model

PLAIN = {"denoise": False}
CONFIGS = {
    "stem + layer1 frozen, frozen BN (previous recipe)": (PLAIN, {"backbone_norm": "frozen", "backbone_frozen_stages": 1}),
    "whole backbone, learnt BN, no training-only branch": (PLAIN, {}),
    "the same + --hybrid": ({**PLAIN, "hybrid": True}, {}),
    "the same + --denoise (this recipe)": ({"denoise": True}, {}),
}


def main(rounds: int = 2, batches: int = 4) -> None:
    dc = load_dataset_config("shapes")
    runs = {}
    for name, (train, model_over) in CONFIGS.items():
        cfg = resolve(dataset_source="shapes", dataset_train=train, dataset_model=model_over, config_path=None,
                      cli={"data": "shapes", "workers": 0})
        ds = build_datasets(cfg, dc)
        torch.manual_seed(0)
        model, _ = build_model(cfg, ds)
        optimizer = build_optimizer(model, cfg)
        module = build_train_module(model, cfg, optimizer).train()
        loader = torch.utils.data.DataLoader(ds.train, batch_size=cfg.batch_size, collate_fn=collate)
        data = [b for _, b in zip(range(batches), loader)]
        runs[name] = (module, build_criterion(cfg, len(ds.category_ids)), optimizer, data, [])
    for r in range(rounds):
        for module, criterion, optimizer, data, times in runs.values():
            for i, (images, mask, targets) in enumerate(data):
                t0 = time.perf_counter()
                train_step(module, criterion, optimizer, images, mask, targets, clip_max_norm=0.1)
                if r or i:
                    times.append(time.perf_counter() - t0)
    base = None
    for name, (*_, times) in runs.items():
        median = sorted(times)[len(times) // 2] * 1000
        base = base or median
        print(f"{name}: {median:.0f} ms/iter (x{median / base:.2f}, {len(times)} steps, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
