"""The tables ``ddetr bench`` prints. Each fits an 80-column terminal: the op's
memory, the roofline and the thread scaling get tables of their own rather
than more columns."""

from __future__ import annotations

from rich import box
from rich.table import Table

WIDTH = 80  # the narrowest terminal the tables are laid out for (tested)


def _fmt(x, spec=".1f", none="-") -> str:
    return none if x is None else format(x, spec)


def _table(title: str, columns: list[str], left: tuple[str, ...] = ("case", "pass", "model", "part")) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right", no_wrap=True)
    return t


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def ms_spec(device: str) -> str:
    return ".3f" if device.startswith("cuda") else ".1f"


def _x(v) -> str:
    return "-" if v is None else f"{v:.1f}x"


def op_table(rows: list[dict], env: dict, threads: int) -> Table:
    """Times, speed-up and roofline of the op at one thread count."""
    dtype = rows[0]["dtype"] if rows else ""
    isa = f" · {env['native_isa']}" if env.get("native_isa") and env["device"] == "cpu" else ""
    t = _table(f"ms_deform_attn · {env['device']} · {dtype} · {_threads(threads)}{isa}",
               ["case", "b", "pass", "ours ms", "grid ms", "gain", "GFLOP/s", "floor"])
    spec = ms_spec(env["device"])
    for r in rows:
        t.add_row(r["case"], str(r["batch"]), r["pass"], _fmt(r.get("native_ms"), spec), _fmt(r.get("torch_ms"), spec),
                  _x(r.get("speedup_vs_torch")), _fmt(r.get("gflops")), _x(r.get("x_floor")))
    t.caption = ("grid: the pure-PyTorch grid_sample op; gain: grid ms / ours ms; GFLOP/s: 8·D FLOP per point forward,"
                 " 24·D forward+backward; floor: ours ms / the time to move the bytes it must at the measured copy rate")
    t.caption_justify = "left"
    return t


def op_memory_table(rows: list[dict], env: dict) -> Table:
    t = _table(f"ms_deform_attn peak memory added by a call · {env['device']} (MB)",
               ["case", "b", "pass", "ours", "grid_sample", "output"])
    for r in rows:
        t.add_row(r["case"], str(r["batch"]), r["pass"], _fmt(r.get("native_peak_mb")), _fmt(r.get("torch_peak_mb")),
                  _fmt(r["output_mb"]))
    return t


def roofline_line(roofline: dict, op_rows: list[dict]) -> str:
    """One line: the machine's measured ceilings and the op's best rate against them."""
    parts = [f"matmul {roofline['matmul_gflops']:.0f} GFLOP/s"]
    if op_rows:
        parts.append(f"copy {op_rows[0]['copy_gb_s']:.1f} GB/s")
        best = max(op_rows, key=lambda r: r.get("gflops") or 0)
        parts.append(f"op best {best['gflops']:.1f} GFLOP/s ({best['gflops'] / roofline['matmul_gflops']:.0%} of matmul, "
                     f"{best['case']} b{best['batch']} {best['pass']})")
    return f"roofline at {_threads(roofline['threads'])}: " + ", ".join(parts)


def scaling_table(rows: list[dict], key: tuple[str, ...], value: str, title: str, spec: str) -> Table:
    """One row per ``key`` tuple and thread count: the time (``value``), the
    speed-up over the fewest threads and the parallel efficiency (speed-up per
    added thread). Long rather than wide, so any number of counts fits."""
    counts = sorted({r["threads"] for r in rows})
    groups: dict[tuple, dict[int, float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key), {})[r["threads"]] = r.get(value)
    t = _table(title, [*key, "threads", "time", "speed-up", "efficiency"])
    for k, by_threads in groups.items():
        base = by_threads.get(counts[0])
        for n in counts:
            v = by_threads.get(n)
            gain = base / v if base and v else None
            eff = gain / (n / counts[0]) if gain else None
            t.add_row(*(str(x) for x in k), str(n), _fmt(v, spec), _x(gain), _fmt(eff, ".0%"))
    return t


def model_table(rows: list[dict], title: str) -> Table:
    t = _table(title, ["model", "ms/img", "vs ref", "backbone", "encoder", "decoder"])
    for r in rows:
        t.add_row(r["name"], _fmt(r["ms_per_img"]), _x(r.get("ratio")), _fmt(r.get("backbone_ms")),
                  _fmt(r.get("encoder_ms")), _fmt(r.get("decoder_ms")))
    if rows and rows[0].get("ratio_vs"):
        t.caption = f"vs ref: {rows[0]['ratio_vs']} time / this time; split columns in ms per image"
        t.caption_justify = "left"
    return t


def model_roofline_table(rows: list[dict], roofline: dict) -> Table:
    """Dense-layer FLOPs per image and the rate each model achieves on them."""
    peak = roofline["matmul_gflops"]
    counted = [r for r in rows if r.get("backbone_gflop") is not None]
    # ours (native op) beside transformers when it ran, else the first two counted rows
    preferred = [r for r in counted if r["name"] in ("ddetr (native op)", "transformers")]
    named = preferred if len(preferred) == 2 else counted[:2]
    t = _table(f"dense layers (convs, matmuls) · matmul peak {peak:.0f} GFLOP/s at {_threads(roofline['threads'])}",
               ["part", "GFLOP/img", *(f"{r['name'][:18]} GFLOP/s" for r in named[:2])])
    for part in ("backbone", "encoder", "decoder"):
        if not named:
            break
        rates = [r.get(f"{part}_gflops") for r in named[:2]]
        t.add_row(part, _fmt(named[0][f"{part}_gflop"]),
                  *(f"{_fmt(v, '.0f')} ({v / peak:.0%})" if v else "-" for v in rates))
    return t


def train_table(rows: list[dict], title: str) -> Table:
    """Training steps; "vs ref" is the reference's time / this time (the
    reference: transformers when it ran, else the first row)."""
    t = _table(title, ["model", "s/iter", "images/s", "vs ref", "peak GB"])
    timed = [r for r in rows if not r.get("error")]
    ref = next((r for r in timed if r.get("name") == "transformers"), timed[0] if timed else None)
    for r in rows:
        if r.get("error"):
            t.add_row(r.get("name", r["model"]), "-", "-", "-", "-")
            continue
        t.add_row(r.get("name", r["model"]), _fmt(r["sec_per_iter"], ".2f"), _fmt(r["images_per_s"], ".2f"),
                  _x(ref["sec_per_iter"] / r["sec_per_iter"]), _fmt(r.get("peak_mem_gb")))
    if ref is not None:
        t.caption = f"vs ref: {ref.get('name', ref['model'])} time / this time"
        t.caption_justify = "left"
    return t
