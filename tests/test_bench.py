"""`ddetr bench` at tiny sizes: the op, --model and --train, with the JSON checked."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ddetr_cli.cli.main import cli

TINY = ["--device", "cpu", "--warmup", "0", "--repeats", "1", "--threads", "1"]


def _bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", *TINY, *args, "--json", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["environment"]["device"]  # who measured it
    return report


def test_bench_op(tmp_path):
    report = _bench(tmp_path, "--case", "decoder", "--batch-size", "1")
    rows = report["op"]
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"} and all(r["batch"] == 1 for r in rows)
    for r in rows:
        assert r["native_ms"] > 0 and r["torch_ms"] > 0, r
        # roofline: 2 FLOP per corner and channel forward, 6 forward+backward (8 heads, 4 levels, 4 points)
        per_point = 4 * 32 * (6 if r["pass"] == "fwd+bwd" else 2)
        assert r["gflop"] == pytest.approx(r["queries"] * 8 * 4 * 4 * per_point / 1e9)
        assert r["gflops"] == pytest.approx(r["gflop"] / (r["native_ms"] / 1e3))
        assert r["copy_gb_s"] > 0 and r["x_floor"] == pytest.approx(r["native_ms"] / r["floor_ms"])
    assert "op" in report and "model" not in report and "train" not in report
    assert [r["threads"] for r in report["roofline"]] == [1] and report["roofline"][0]["matmul_gflops"] > 0


def test_bench_encoder_inputs_sample_around_each_querys_own_pixel():
    """The encoder cases feed the op what the model's encoder does: query i of level l sits at the centre
    of its own pixel, so neighbouring queries sample neighbouring places; the -random cases and the
    decoder scatter them."""
    import torch

    from ddetr_cli.bench.op import CASES, level_shapes, make_inputs

    device = torch.device("cpu")
    _, spatial, start, loc, _ = make_inputs(CASES["encoder"], 2, torch.float32, device)
    shapes = level_shapes(CASES["encoder"].image)
    centre = loc.mean(dim=(2, 3, 4))  # [N, S, 2]: points scatter around the reference, so their mean is near it
    for (h, w), first in zip(shapes, start.tolist()):
        for i in (0, w + 1, h * w - 1):  # first pixel, (1, 1), last pixel of the level
            y, x = divmod(i, w)
            want = torch.tensor([(x + 0.5) / w, (y + 0.5) / h])
            assert torch.allclose(centre[:, first + i], want.expand(2, 2), atol=0.01), (h, w, i)
    random_loc = make_inputs(CASES["encoder-random"], 1, torch.float32, device)[3].mean(dim=(2, 3, 4))[0]
    neighbour_gap = (random_loc[1:100] - random_loc[:99]).abs().max()
    assert neighbour_gap > 0.1  # scattered: neighbouring queries sample far apart


def test_bench_case_choices_are_the_op_cases():
    from ddetr_cli.bench.op import CASES, DEFAULT_CASES
    from ddetr_cli.cli.bench import OP_CASES

    assert set(OP_CASES) == set(CASES) and set(DEFAULT_CASES) <= set(CASES)


def test_bench_thread_scaling(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--case", "decoder", "--batch-size", "1",
            "--no-torch", "--threads", "1,2", "--threads", "3", "--json", str(out)]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["environment"]["thread_counts"] == [1, 2, 3]
    assert sorted({r["threads"] for r in report["op"]}) == [1, 2, 3] and len(report["op"]) == 6
    assert "thread scaling" in res.output and "efficiency" in res.output


@pytest.mark.parametrize("bad, why", [("0", "must be >= 1"), ("two", "not a thread count")])
def test_bench_threads_rejects_bad_counts(bad, why):
    res = CliRunner().invoke(cli, ["bench", "--threads", bad])
    assert res.exit_code == 2 and "'--threads'" in res.output and why in res.output


def test_bench_tables_fit_80_columns():
    """Every table bench prints, filled with realistic (long) values, fits an
    80-column terminal without truncating a cell."""
    import io

    from rich.console import Console

    from ddetr_cli.cli import bench_tables as tables

    env = {"device": "cpu", "native_isa": "avx512bf16"}
    op = [{"case": "encoder 800x1333", "batch": 2, "pass": "fwd+bwd", "native_ms": 12345.6, "torch_ms": 123456.7,
           "speedup_vs_torch": 123.4, "gflops": 1234.5, "x_floor": 123.4, "native_peak_mb": 12345.6,
           "torch_peak_mb": 123456.7, "output_mb": 1234.5, "copy_gb_s": 12.3, "threads": n, "dtype": "bfloat16"}
          for n in (1, 2, 4, 8, 16, 32, 64)]
    model = [{"name": name, "ms_per_img": 12345.6, "ratio": 12.3, "ratio_vs": "transformers", "backbone_ms": 12345.6,
              "encoder_ms": 12345.6, "decoder_ms": 1234.5, "backbone_gflop": 140.1, "backbone_gflops": 1234.5,
              "encoder_gflop": 160.2, "encoder_gflops": 1234.5, "decoder_gflop": 12.3, "decoder_gflops": 123.4,
              "threads": n}
             for name in ("ddetr (native op)", "ddetr (torch op)", "transformers") for n in (1, 2, 4, 8, 16, 32, 64)]
    train = [{"name": name, "model": "r50", "sec_per_iter": 123.45, "images_per_s": 12.34, "peak_mem_gb": 123.4}
             for name in ("ddetr (native op)", "ddetr (torch op)", "transformers")]
    roof = {"threads": 64, "matmul_gflops": 12345.6}
    rendered = [
        tables.op_table(op, env, 64), tables.op_memory_table(op, env), tables.roofline_line(roof, op),
        tables.scaling_table(op, ("case", "batch", "pass"), "native_ms", "thread scaling · ours ms", ".1f"),
        tables.model_table(model, "Deformable DETR R50 inference · cpu · float32 · 800x1066 · 64 threads"),
        tables.model_roofline_table(model, roof), tables.scaling_table(model, ("name",), "ms_per_img", "scaling", ".1f"),
        tables.train_table(train, "Training step R50 · cpu · 2 threads"),
    ]
    for thing in rendered:
        buf = io.StringIO()
        Console(file=buf, width=80, color_system=None).print(thing)
        text = buf.getvalue()
        assert max(len(line) for line in text.splitlines()) <= 80, text
        assert "…" not in text, text


@pytest.mark.slow
def test_bench_model_and_train(tmp_path):
    report = _bench(tmp_path, "--model", "--train", "--no-hf", "--input-size", "64", "96", "--batch-size", "1")
    rows = {r["name"]: r for r in report["model"]}
    assert {"ddetr (native op)", "ddetr (torch op)"} <= set(rows)  # HF skipped with --no-hf
    for row in rows.values():
        assert (row["height"], row["width"], row["batch"]) == (64, 96, 1)
        assert row["ms_per_img"] > 0 and all(row[k] > 0 for k in ("backbone_ms", "encoder_ms", "decoder_ms")), row
    for part in ("backbone", "encoder", "decoder"):  # the dense-layer roofline
        row = rows["ddetr (native op)"]
        assert row[f"{part}_gflop"] > 0 and row[f"{part}_gflops"] == pytest.approx(
            row[f"{part}_gflop"] / (row[f"{part}_ms"] / 1e3)), row
    # the native and grid_sample ops side by side; the transformers row skipped with --no-hf
    assert [r["name"] for r in report["train"]] == ["ddetr (native op)", "ddetr (torch op)"]
    for train in report["train"]:
        assert (train["height"], train["width"], train["batch"], train["iters"]) == (64, 96, 1, 1)
        assert train["images_per_s"] > 0 and train["sec_per_iter"] > 0, train


def test_bench_bad_device_names_the_flag():
    res = CliRunner().invoke(cli, ["bench", "--device", "tpu"])
    assert res.exit_code == 2 and "'--device'" in res.output and "unknown device" in res.output


def test_unknown_cpu_isa_is_one_line_error(tmp_path):
    """A wrong $DDETR_CPU_ISA is the user's mistake: one line naming it, no traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DDETR_CPU_ISA": "bogus"}
    res = subprocess.run([sys.executable, "-m", "ddetr_cli", "bench", "--case", "decoder", "--batch-size", "1",
                          "--repeats", "1", "--warmup", "0", "--no-torch"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)  # not the checkout: the installed package
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "DDETR_CPU_ISA: unknown instruction set 'bogus'" in res.stderr, res.stderr


def test_cpu_timing_is_not_preceded_by_the_memory_reset(monkeypatch):
    """Measuring peak memory hands the freed heap back to the OS; a call timed
    after that would pay page faults that a process running the op in a loop
    does not. The reset comes once, after every timed call, for one extra call
    whose peak is reported."""
    import torch

    from ddetr_cli.bench import timing

    events = []
    monkeypatch.setattr(timing, "_reset_cpu_peak", lambda: events.append("reset") or True)
    monkeypatch.setattr(timing, "_rss_bytes", lambda field: {"VmRSS": 1000, "VmHWM": 5096}[field])
    t = timing.measure(lambda: events.append("call"), torch.device("cpu"), warmup=1, repeats=3)
    assert events == ["call"] * 4 + ["reset", "call"]
    assert len(t.times_ms) == 3 and t.peak_extra_bytes == 4096
