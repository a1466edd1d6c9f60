"""``ddetr bench``: the deformable-attention op (default), the whole model
(``--model``) or a training step (``--train``), native and reference side by
side in one run."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import click

from . import options
from .app import App, pass_app
from .errors import user_errors

DTYPES = ("float32", "bfloat16", "float16", "float64")
# The keys of bench.op.CASES, spelled out here because the CLI starts without
# importing torch (tests/test_bench.py checks the two agree).
OP_CASES = ("encoder", "encoder-1333", "decoder", "encoder-random", "encoder-1333-random")


def _environment(device) -> dict:
    import torch

    from ..ops import extension

    ext = extension()
    env = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "native_isa": ext.cpu_isa() if ext is not None else None,
        "openmp": bool(ext.has_openmp()) if ext is not None else None,
        "cuda_kernels": bool(ext.has_cuda()) if ext is not None else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:  # the reference rows' version, when it is installed (not imported here: metadata only)
        from importlib.metadata import PackageNotFoundError, version

        env["transformers"] = version("transformers")
    except PackageNotFoundError:
        env["transformers"] = None
    return env


def parse_threads(values: tuple[str, ...]) -> list[int]:
    """``--threads 1,2,4`` / ``--threads "1 2 4"`` / repeated -> [1, 2, 4] (order kept, duplicates dropped)."""
    counts: list[int] = []
    for value in values:
        for item in value.replace(",", " ").split():
            try:
                n = int(item)
            except ValueError:
                raise click.BadParameter(f"{item!r} is not a thread count", param_hint="'--threads'") from None
            if n < 1:
                raise click.BadParameter(f"thread counts must be >= 1, got {n}", param_hint="'--threads'")
            if n not in counts:
                counts.append(n)
    return counts


@click.command("bench")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N | auto")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Op: tensor dtype. --model/--train: float32, or bfloat16/float16 autocast.")
@click.option("--case", "cases", multiple=True, type=click.Choice(OP_CASES),
              help="Op shapes to time (repeatable; default encoder, encoder-1333 and decoder). Encoder queries sample "
                   "around their own pixel, as in the model; the -random cases around random points.")
@click.option("--batch-size", "batches", multiple=True, type=click.IntRange(1),
              help="Batch sizes (repeatable; default: op 1 and 2, --model 1, --train 2).")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
@click.option("--threads", multiple=True, metavar="N[,N...]",
              help="CPU thread counts: one, or a list (1,2,4,8 or repeated) for a thread-scaling table (default: PyTorch's).")
@click.option("--no-torch", is_flag=True, help="Op and --model: skip the slow grid_sample reference.")
@click.option("--model", "model_bench", is_flag=True, help="End-to-end R50 Deformable DETR inference (ours native/torch op, HF if installed).")
@click.option("--train", "train_bench", is_flag=True, help="Training throughput (images/s) of R50 at the official recipe.")
@click.option("--input-size", "input_size", type=(click.IntRange(16), click.IntRange(16)), default=(800, 1066),
              show_default=True, metavar="H W", help="--model/--train: the padded input batch, H W pixels.")
@click.option("--no-hf", is_flag=True, help="--model/--train: skip Hugging Face transformers even when installed.")
@options.weights("--model: time these weights instead of a random R50 (an exported .onnx adds an onnxruntime row "
                 "beside the random-weight R50 rows)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the figures as JSON to PATH ('-' for stdout).")
@pass_app
def command(app: App, device, dtype, cases, batches, warmup, repeats, threads, no_torch, model_bench, train_bench,
            input_size, no_hf, weights, json_path) -> None:
    """Time the native deformable-attention kernel against the PyTorch path.

    Reports medians over --repeats runs after --warmup runs, the speed-up and the
    extra peak memory, side by side in one run. Use --model for the whole
    detector and --train for a training step.
    """
    import torch

    from ..bench.roofline import matmul_gflops
    from ..engine.parts.device import resolve_device

    with user_errors():
        dev = resolve_device(device)
    counts = parse_threads(threads) or [torch.get_num_threads()]
    torch.set_num_threads(counts[0])
    with user_errors():  # e.g. an unknown $DDETR_CPU_ISA
        env = {**_environment(dev), "thread_counts": counts}
    op_only = not model_bench and not train_bench
    if op_only:
        _check_op_available(dev, device, dtype)
    torch_dtype = getattr(torch, dtype)
    # The dense layers' ceiling is a matmul in the dtype they run in; the op
    # accumulates in float32 (float64), so its ceiling is a float32 (float64) matmul.
    ceiling_dtype = (torch.float64 if dtype == "float64" else torch.float32) if op_only else torch_dtype
    report: dict = {"environment": env, "roofline": []}
    status = app.err.status("benchmarking…") if app.interactive else None

    def progress(msg: str) -> None:
        if status is not None:
            status.update(f"benchmarking {msg}…")
        elif app.verbose:
            app.info(msg)

    if status is not None:
        status.start()
    try:
        for n in counts:
            torch.set_num_threads(n)
            progress(f"matmul ceiling at {n} threads")
            report["roofline"].append({"threads": n, "matmul_gflops": matmul_gflops(dev, ceiling_dtype)})
            if model_bench:
                report.setdefault("model", []).extend(
                    _bench_model(dev, dtype, batches, input_size, warmup, repeats, no_hf, no_torch, weights, progress))
            if train_bench:
                report.setdefault("train", []).extend(
                    _bench_train(dev, dtype, batches, input_size, warmup, repeats, no_hf, no_torch, progress))
            if op_only:
                from ..bench.op import bench_op

                report.setdefault("op", []).extend(bench_op(
                    dev, dtype=torch_dtype, cases=list(cases) or None, batches=tuple(batches) or (1, 2),
                    backends=("native",) if no_torch else ("native", "torch"), warmup=warmup, repeats=repeats,
                    progress=lambda msg, n=n: progress(f"{msg} ({n} threads)")))
    except torch.cuda.OutOfMemoryError as exc:
        raise click.ClickException(f"out of GPU memory ({str(exc).splitlines()[0]}); try --batch-size 1 or a smaller --input-size") from None
    finally:
        if status is not None:
            status.stop()

    if json_path is not None and str(json_path) == "-":
        app.out.print_json(json.dumps(report))
        return
    _print_report(app, report, env, dtype, input_size)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        app.info(f"figures written to {json_path}")


def _check_op_available(dev, device: str, dtype: str) -> None:
    from ..ops import extension_error, native_supports

    if not native_supports(dev):
        why = extension_error() or f"this build has no {dev.type.upper()} kernels"
        raise click.ClickException(f"--device {device}: the native kernel is unavailable ({why})")
    allowed = {"cpu": ("float32", "float64", "bfloat16")}.get(dev.type, DTYPES)
    if dtype not in allowed:
        raise click.BadParameter(f"{dtype} is not supported by the {dev.type} kernel ({', '.join(allowed)})", param_hint="--dtype")


def _bench_model(dev, dtype, batches, input_size, warmup, repeats, no_hf, no_torch, weights, progress) -> list[dict]:
    from ..bench.model import bench_model

    model = onnx = None
    if weights is not None:
        from ..engine.loops.runner import is_onnx, load_runner

        with user_errors():
            runner = load_runner(weights, dev)
        onnx, model = (runner.path, None) if is_onnx(runner) else (None, runner.model)
    return bench_model(dev, dtype=dtype, batch=(batches or (1,))[0], height=input_size[0], width=input_size[1],
                       warmup=warmup, repeats=repeats, include_hf=not no_hf, include_torch_op=not no_torch,
                       progress=progress, model=model, onnx=onnx)


def _bench_train(dev, dtype, batches, input_size, warmup, repeats, no_hf, no_torch, progress) -> list[dict]:
    from ..bench.train import bench_train, bench_train_hf

    args = dict(batch=(batches or (2,))[0], height=input_size[0], width=input_size[1], iters=repeats, warmup=warmup,
                amp={"bfloat16": "bf16", "float16": "fp16"}.get(dtype))
    rows = []
    for backend in ("native",) if no_torch else ("native", "torch"):
        rows.append(bench_train(dev, **args, backend=backend,
                                progress=lambda done, total, b=backend: progress(f"training step ({b} op) {done}/{total}")))
    if not no_hf:
        progress("transformers training step")
        rows.append(bench_train_hf(dev, **args))
    return rows


def _print_report(app: App, report: dict, env: dict, dtype: str, input_size) -> None:
    from . import bench_tables as tables

    counts = env["thread_counts"]
    rooflines = {r["threads"]: r for r in report["roofline"]}
    for n in counts:
        def at(rows: list[dict], n=n) -> list[dict]:
            return [r for r in rows if r.get("threads", n) == n]

        if "op" in report:
            app.out.print(tables.op_table(at(report["op"]), env, n))
            app.out.print(tables.op_memory_table(at(report["op"]), env))
            app.out.print(tables.roofline_line(rooflines[n], at(report["op"])))
        if "model" in report:
            title = f"R50 inference · {env['device']} · {dtype} · {input_size[0]}x{input_size[1]} · {n} threads"
            app.out.print(tables.model_table(at(report["model"]), title))
            app.out.print(tables.model_roofline_table(at(report["model"]), rooflines[n]))
        if "train" in report:
            app.out.print(tables.train_table(at(report["train"]), f"R50 training step · {env['device']} · {n} threads"))
    if len(counts) > 1 and "op" in report:
        app.out.print(tables.scaling_table(report["op"], ("case", "batch", "pass"), "native_ms",
                                           "thread scaling · ours ms", tables.ms_spec(env["device"])))
    if len(counts) > 1 and "model" in report:
        app.out.print(tables.scaling_table(report["model"], ("name",), "ms_per_img", "thread scaling · ms per image", ".1f"))
