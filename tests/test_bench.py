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
    assert "op" in report and "model" not in report and "train" not in report


@pytest.mark.slow
def test_bench_model_and_train(tmp_path):
    report = _bench(tmp_path, "--model", "--train", "--no-hf", "--input-size", "64", "96", "--batch-size", "1")
    rows = {r["name"]: r for r in report["model"]}
    assert {"ddetr (native op)", "ddetr (torch op)"} <= set(rows)  # HF skipped with --no-hf
    for row in rows.values():
        assert (row["height"], row["width"], row["batch"]) == (64, 96, 1)
        assert row["ms_per_img"] > 0 and all(row[k] > 0 for k in ("backbone_ms", "encoder_ms", "decoder_ms")), row
    assert [r["model"] for r in report["train"]] == ["r50"]  # the transformers row skipped with --no-hf
    train = report["train"][0]
    assert (train["height"], train["width"], train["batch"], train["iters"]) == (64, 96, 1, 1)
    assert train["images_per_s"] > 0 and train["sec_per_iter"] > 0, train


def test_bench_bad_device_names_the_flag():
    res = CliRunner().invoke(cli, ["bench", "--device", "tpu"])
    assert res.exit_code == 2 and "'--device'" in res.output and "unknown device" in res.output
