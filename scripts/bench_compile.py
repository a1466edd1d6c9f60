"""The whole R50 model for inference, eager against torch.compile (inductor), on
one input: the first compiled call (compilation) is timed apart, then the
medians of both after warm-up.

    python scripts/bench_compile.py --device cpu --input-size 800 1066 --repeats 3 [--freezing]

Random weights, fused for inference (as predict, eval and ``bench --model``
run it), batch 1, float32, denormals flushed on the CPU (as ``ddetr bench``).
``--freezing`` sets ``torch._inductor.config.freezing`` (weights treated as
constants: constant folding and weight pre-packing on the CPU).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from ddetr_cli.bench.timing import measure
    from ddetr_cli.models import build_model, fuse_for_inference, preset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--input-size", nargs=2, type=int, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--freezing", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = fuse_for_inference(build_model(preset("r50")).to(device).eval())
    images = torch.randn(1, 3, *args.input_size, generator=torch.Generator().manual_seed(0)).to(device)
    if args.freezing:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        eager = measure(lambda: model(images), device, warmup=1, repeats=args.repeats).median_ms
        t0 = time.perf_counter()
        compiled(images)  # compiles
        compile_s = time.perf_counter() - t0
        fast = measure(lambda: compiled(images), device, warmup=1, repeats=args.repeats).median_ms
        got, want = compiled(images), model(images)
    diff = max((got[k] - want[k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))
    print(f"{device} {args.input_size[0]}x{args.input_size[1]} threads {torch.get_num_threads()} "
          f"freezing {args.freezing}: eager {eager:.0f} ms, compiled {fast:.0f} ms ({eager / fast:.2f}x), "
          f"compilation {compile_s:.0f} s, max abs difference {diff:.1e}")


if __name__ == "__main__":
    main()
