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
    return env


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def _op_table(rows, env):
    from rich.table import Table

    t = Table(title=f"ms_deform_attn on {env['device']} · {rows[0]['dtype'] if rows else ''} · {env['threads']} threads"
              f"{' · ' + env['native_isa'] if env.get('native_isa') else ''}", title_justify="left")
    floor = bool(rows) and "floor_ms" in rows[0]
    cols = ["case", "batch", "pass", "native ms", "torch ms", "speed-up", "native peak MB", "torch peak MB", "output MB"]
    if floor:
        cols += ["floor ms", "x floor"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("case", "pass") else "right")
    spec = ".3f" if env["device"].startswith("cuda") else ".1f"
    for r in rows:
        cells = [
            r["case"], str(r["batch"]), r["pass"], _fmt(r.get("native_ms"), spec), _fmt(r.get("torch_ms"), spec),
            _fmt(r.get("speedup_vs_torch"), ".1f") + ("x" if r.get("speedup_vs_torch") else ""),
            _fmt(r.get("native_peak_mb")), _fmt(r.get("torch_peak_mb")), _fmt(r["output_mb"]),
        ]
        if floor:
            cells += [_fmt(r["floor_ms"], ".3f"), _fmt(r["x_floor"], ".1f") + "x"]
        t.add_row(*cells)
    return t


def _rows_table(title: str, rows: list[dict]):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (list, dict))))
    for c in cols:
        sample = next(r[c] for r in rows if c in r)
        t.add_column(c, justify="left" if isinstance(sample, str) else "right")
    for r in rows:
        t.add_row(*(_fmt(r.get(c), ".2f") if isinstance(r.get(c), float) else "-" if r.get(c) is None else str(r[c])
                    for c in cols))
    return t


@click.command("bench")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N | auto")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Op: tensor dtype. --model/--train: float32, or bfloat16/float16 autocast.")
@click.option("--case", "cases", multiple=True, type=click.Choice(["encoder", "encoder-1333", "decoder"]),
              help="Op shapes to time (repeatable; default all).")
@click.option("--batch-size", "batches", multiple=True, type=click.IntRange(1),
              help="Batch sizes (repeatable; default: op 1 and 2, --model 1, --train 2).")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads (default: PyTorch's).")
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

    from ..engine.parts.device import resolve_device

    with user_errors():
        dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    env = _environment(dev)
    report: dict = {"environment": env}
    status = app.err.status("benchmarking…") if app.interactive else None

    def progress(msg: str) -> None:
        if status is not None:
            status.update(f"benchmarking {msg}…")
        elif app.verbose:
            app.info(msg)

    if status is not None:
        status.start()
    try:
        if model_bench:
            from ..bench.model import bench_model

            model = onnx = None
            if weights is not None:
                from ..engine.loops.runner import is_onnx, load_runner

                with user_errors():
                    runner = load_runner(weights, dev)
                onnx, model = (runner.path, None) if is_onnx(runner) else (None, runner.model)
            rows = bench_model(dev, dtype=dtype, batch=(batches or (1,))[0], height=input_size[0], width=input_size[1],
                               warmup=warmup, repeats=repeats, include_hf=not no_hf, include_torch_op=not no_torch,
                               progress=progress, model=model, onnx=onnx)
            report["model"] = rows
        if train_bench:
            from ..bench.train import bench_train

            from ..bench.train import bench_train_hf

            train_args = dict(batch=(batches or (2,))[0], height=input_size[0], width=input_size[1], iters=repeats,
                              warmup=warmup, amp={"bfloat16": "bf16", "float16": "fp16"}.get(dtype))
            rows = [bench_train(dev, **train_args, progress=lambda done, total: progress(f"training step {done}/{total}"))]
            if not no_hf:
                progress("transformers training step")
                hf_row = bench_train_hf(dev, **train_args)
                if hf_row.get("error") is None:
                    hf_row["ddetr_speedup"] = rows[0]["sec_per_iter"] and hf_row["sec_per_iter"] / rows[0]["sec_per_iter"]
                rows.append(hf_row)
            report["train"] = rows
        if not model_bench and not train_bench:
            from ..bench.op import bench_op
            from ..ops import native_supports

            if not native_supports(dev):
                from ..ops import extension_error

                why = extension_error() or f"this build has no {dev.type.upper()} kernels"
                raise click.ClickException(f"--device {device}: the native kernel is unavailable ({why})")
            allowed = {"cpu": ("float32", "float64", "bfloat16")}.get(dev.type, DTYPES)
            if dtype not in allowed:
                raise click.BadParameter(f"{dtype} is not supported by the {dev.type} kernel ({', '.join(allowed)})", param_hint="--dtype")
            report["op"] = bench_op(dev, dtype=torch_dtype, cases=list(cases) or None, batches=tuple(batches) or (1, 2),
                                    backends=("native",) if no_torch else ("native", "torch"),
                                    warmup=warmup, repeats=repeats, progress=progress)
    except torch.cuda.OutOfMemoryError as exc:
        raise click.ClickException(f"out of GPU memory ({str(exc).splitlines()[0]}); try --batch-size 1 or a smaller --input-size") from None
    finally:
        if status is not None:
            status.stop()

    if json_path is not None and str(json_path) == "-":
        app.out.print_json(json.dumps(report))
        return
    if "op" in report:
        app.out.print(_op_table(report["op"], env))
    if "model" in report:
        app.out.print(_rows_table(f"Deformable DETR R50 inference on {env['device']} · {dtype} · {input_size[0]}x{input_size[1]}", report["model"]))
    if "train" in report:
        rows = report["train"] if isinstance(report["train"], list) else [report["train"]]
        app.out.print(_rows_table(f"Training step R50 on {env['device']}", rows))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        app.info(f"figures written to {json_path}")
