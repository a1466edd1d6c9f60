"""A/B timing of the CPU deformable-attention kernel between two revisions.

Builds cpp/msda_cpu.cpp (with its headers) from revision A and from revision B
into one program (scripts/ab_cpu_kernel.cpp), feeds both the inputs of a
`ddetr bench` case, and calls them alternately, call by call, so that both
see the same machine load; prints the medians, B/A, and whether the outputs
and gradients are bitwise equal. The kernel alone is timed: no Python, no
allocation. Needs g++ with OpenMP and git; the two revisions must share the
params structs of cpp/include/ddetr/msda.h.

    python scripts/ab_cpu_kernel.py A B [--case encoder] [--batch-size 1]
        [--threads 2] [--rounds 10] [--pass fwd --pass bwd] [--isa avx2]

A and B are git revisions, or `worktree` for the files on disk.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ddetr_cli.bench.op import CASES, make_inputs

ROOT = Path(__file__).resolve().parent.parent
# The instruction-set flags of CMakeLists.txt's builds, with the kernel's own options.
ISA_FLAGS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx512bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx512bf16"],
}
KERNEL_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-std=c++17"]


def export_sources(rev: str, dest: Path) -> None:
    """cpp/msda_cpu.cpp and cpp/include of `rev` (or the work tree) under `dest`."""
    if rev == "worktree":
        shutil.copytree(ROOT / "cpp" / "include", dest / "include")
        shutil.copy(ROOT / "cpp" / "msda_cpu.cpp", dest / "msda_cpu.cpp")
        return
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, "cpp/include", "cpp/msda_cpu.cpp"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        target = dest / Path(name).relative_to("cpp")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True,
                                          capture_output=True).stdout)


def write_inputs(case: str, batch: int, dest: Path) -> None:
    value, spatial, start, loc, attn = make_inputs(CASES[case], batch, torch.float32, torch.device("cpu"))
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    levels = " ".join(f"{int(h)} {int(w)} {int(s)}" for (h, w), s in zip(spatial.tolist(), start.tolist()))
    (dest / "shape.txt").write_text(f"{N} {S} {M} {D} {Lq} {L} {P} {levels}\n")
    for name, t in (("value", value), ("loc", loc), ("attn", attn)):
        t.contiguous().numpy().tofile(dest / f"{name}.bin")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--case", default="encoder", choices=sorted(CASES))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--pass", dest="passes", action="append", choices=["fwd", "bwd"])
    parser.add_argument("--isa", default="avx2", choices=sorted(ISA_FLAGS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ab_cpu_kernel_") as tmp:
        work = Path(tmp)
        objects = []
        for tag, rev in (("va", args.a), ("vb", args.b)):
            src = work / tag
            export_sources(rev, src)
            obj = work / f"{tag}.o"
            subprocess.run(["g++", *KERNEL_FLAGS, *ISA_FLAGS[args.isa], f"-I{src / 'include'}", f"-DDDETR_CPU_ISA={tag}",
                            "-c", str(src / "msda_cpu.cpp"), "-o", str(obj)], check=True)
            objects.append(str(obj))
        exe = work / "ab_cpu_kernel"
        subprocess.run(["g++", "-O2", "-std=c++17", "-fopenmp", f"-I{ROOT / 'cpp' / 'include'}",
                        str(ROOT / "scripts" / "ab_cpu_kernel.cpp"), *objects, "-o", str(exe)], check=True)
        write_inputs(args.case, args.batch_size, work)
        print(f"A = {args.a}, B = {args.b}; {args.case}, batch {args.batch_size}, {args.isa} build")
        for which in args.passes or ["fwd", "bwd"]:
            subprocess.run([str(exe), str(work), str(args.rounds), which, str(args.threads)], check=True)


if __name__ == "__main__":
    main()
