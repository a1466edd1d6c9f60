"""The CUDA kernel variants side by side, kernel time only: the forward's two
paths (staged, general) and the two task orders (query-major, head-major), at
the encoder's shape and at growing decoder-like shapes, so the defaults in
cpp/msda_cuda.cu (the staged forward wherever it can run, and
kDefaultHeadMajorForward / Backward) rest on measurements.

    python scripts/bench_cuda_variants.py [--json PATH]

Each variant is captured in a CUDA graph of 10 calls (no Python or launch
overhead in the figure) and replayed; the table gives the median per call of
20 replays, in microseconds, with the variant chosen through the developer
switches DDETR_CUDA_FORWARD, DDETR_CUDA_ORDER and DDETR_CUDA_ATOMICS
(fwd_bwd_head_strided: the backward's scalar atomics over each lane's own
vector, the layout before the atomic layout; the same kernel code where one
vector atomic adds a lane's vector, i.e. float32 and 16-bit types built for
sm_90).
``--backward-only`` leaves out the forward variants.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

CALLS_PER_GRAPH = 10


def graph_time_us(fn, replays: int = 20) -> float:
    """Median microseconds per call of ``fn`` replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # warm-up outside the graph: lazy initialisation, allocator pools
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS_PER_GRAPH)
    return statistics.median(times)


def main() -> None:
    from ddetr_cli.bench.op import CASES, OpCase, make_inputs
    from ddetr_cli.ops import ms_deform_attn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--backward-only", action="store_true", help="time forward+backward only")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")

    shapes = [(CASES["encoder-1333"], 2), (CASES["encoder-1333-random"], 2), (CASES["encoder-1333"], 1)]
    shapes += [(OpCase(f"decoder {q} queries", (800, 1333), q, refs="random"), b)
               for q, b in ((300, 1), (300, 8), (900, 8), (2700, 8), (8100, 8))]
    rows = []
    for case, batch in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            value, spatial, start, loc, attn = make_inputs(case, batch, dtype, device)
            groups = loc.shape[0] * loc.shape[1] * loc.shape[2]
            grad = torch.randn(*loc.shape[:2], value.shape[2] * value.shape[3], device=device, dtype=dtype)
            v = value.detach().clone().requires_grad_()
            lo, at = loc.detach().clone().requires_grad_(), attn.detach().clone().requires_grad_()

            def fwd():
                with torch.no_grad():
                    ms_deform_attn(value, spatial, start, loc, attn, backend="native")

            def fwd_bwd():
                out = ms_deform_attn(v, spatial, start, lo, at, backend="native")
                torch.autograd.grad(out, (v, lo, at), grad)

            row = {"case": case.name, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "groups": groups}
            for forward in () if args.backward_only else ("staged", "general"):
                for order in ("query", "head"):
                    os.environ["DDETR_CUDA_FORWARD"], os.environ["DDETR_CUDA_ORDER"] = forward, order
                    row[f"fwd_{forward}_{order}_us"] = graph_time_us(fwd)
            for order, atomics in (("query", "auto"), ("head", "auto"), ("head", "strided")):
                os.environ["DDETR_CUDA_FORWARD"], os.environ["DDETR_CUDA_ORDER"] = "auto", order
                os.environ["DDETR_CUDA_ATOMICS"] = atomics
                row[f"fwd_bwd_{order}{'_strided' if atomics == 'strided' else ''}_us"] = graph_time_us(fwd_bwd)
            for name in ("DDETR_CUDA_FORWARD", "DDETR_CUDA_ORDER", "DDETR_CUDA_ATOMICS"):
                os.environ.pop(name)
            rows.append(row)
            cells = " ".join(f"{k[:-3]}={row[k]:.1f}" for k in row if k.endswith("_us"))
            print(f"{case.name:32s} b{batch} {row['dtype']:8s} groups={groups:7d} {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
