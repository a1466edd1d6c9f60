"""Mixed precision on the CPU is honest: bf16 only where the CPU has it natively
(else float32 and one warning), ``auto`` picks it only there, DDETR_CPU_BF16
overrides, and training follows the same rule."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from ddetr_cli.engine.parts import amp
from ddetr_cli.errors import DdetrError

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Sets whether 'this CPU' has native bf16, whatever the machine running the test has."""
    monkeypatch.delenv(amp.ENV_CPU_BF16, raising=False)

    def set_native(native: bool) -> None:
        monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: native)

    return set_native


@pytest.mark.parametrize("mode, native, env, dtype, warns", [
    ("off", False, None, None, False),
    ("auto", False, None, None, False),
    ("bf16", False, None, None, True),
    ("fp16", False, None, None, True),
    ("auto", True, None, torch.bfloat16, False),
    ("bf16", True, None, torch.bfloat16, False),
    ("fp16", True, None, torch.bfloat16, False),  # fp16 means bf16 on a CPU
    ("bf16", False, "1", torch.bfloat16, False),  # emulated, asked for
    ("auto", False, "1", torch.bfloat16, False),
    ("bf16", True, "0", None, True),
    ("off", True, "1", None, False),
])
def test_cpu_modes(cpu_bf16, monkeypatch, mode, native, env, dtype, warns):
    cpu_bf16(native)
    if env is not None:
        monkeypatch.setenv(amp.ENV_CPU_BF16, env)
    got, note = amp.resolve_amp(mode, CPU)
    assert got == dtype
    assert (note is not None) == warns
    if warns:
        assert "\n" not in note and "float32" in note and "DDETR_CPU_BF16=1" in note and mode in note


def test_cuda_modes_are_unchanged(cpu_bf16):
    cpu_bf16(False)
    cuda = torch.device("cuda")
    assert amp.resolve_amp("bf16", cuda) == (torch.bfloat16, None)
    assert amp.resolve_amp("fp16", cuda) == (torch.float16, None)


def test_bad_override_names_the_variable(monkeypatch):
    monkeypatch.setenv(amp.ENV_CPU_BF16, "maybe")
    with pytest.raises(DdetrError, match="DDETR_CPU_BF16: expected 1"):
        amp.resolve_amp("bf16", CPU)


def test_native_bf16_detection():
    assert isinstance(amp.cpu_has_native_bf16(), bool)
    if hasattr(torch.cpu, "_is_avx512_bf16_supported") and torch.backends.cpu.get_cpu_capability() != "NO AVX":
        import platform

        if platform.machine().lower() in ("x86_64", "amd64"):
            assert amp.cpu_has_native_bf16() == bool(torch.cpu._is_avx512_bf16_supported()
                                                     or torch.cpu._is_amx_tile_supported())
    neoverse = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm sve2\n"
    a72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nBogoMIPS\t: 108.00\n"
    assert amp.cpuinfo_has_bf16(neoverse) and not amp.cpuinfo_has_bf16(a72)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from ddetr_cli.checkpoints import save_model
    from ddetr_cli.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("tiny", num_classes=3)).eval()
    return save_model(model, tmp_path_factory.mktemp("amp") / "tiny.pt")


def _image(tmp_path):
    import cv2
    import numpy as np

    path = tmp_path / "a.png"
    cv2.imwrite(str(path), (np.random.default_rng(0).random((64, 80, 3)) * 255).astype("uint8"))
    return path


def test_predict_bf16_without_native_bf16_warns_once_and_runs_float32(cpu_bf16, tiny_weights, tmp_path):
    import json

    from ddetr_cli.cli.main import cli

    cpu_bf16(False)
    image = _image(tmp_path)
    outs = {}
    for mode in ("off", "bf16"):
        r = CliRunner().invoke(cli, ["predict", str(image), "-w", str(tiny_weights), "--device", "cpu", "--amp", mode,
                                     "--conf", "0", "--imgsz", "64", "--json", "--out", str(tmp_path / mode)])
        assert r.exit_code == 0, r.output
        outs[mode] = json.loads(r.stdout)
        warnings = [line for line in r.stderr.splitlines() if "native bf16" in line]
        assert len(warnings) == (1 if mode == "bf16" else 0), r.stderr
    assert outs["bf16"][0]["detections"] == outs["off"][0]["detections"]  # it ran in float32


def test_training_follows_the_same_rule(cpu_bf16, monkeypatch, tmp_path):
    from ddetr_cli.data import ensure_shapes_dataset
    from ddetr_cli.engine.config import TrainConfig
    from ddetr_cli.engine.run_train import build_trainer

    data = ensure_shapes_dataset(tmp_path / "shapes", n_train=2, n_val=1, size=64)
    cfg = TrainConfig(model="tiny", data=str(data), amp="bf16", imgsz=64, workers=0, epochs=1).validate()
    cpu_bf16(False)
    warned: list[str] = []
    trainer = build_trainer(cfg, None, CPU, warn=warned.append, log=lambda m: None)
    assert trainer.dtype is None and len(warned) == 1 and "float32" in warned[0]
    monkeypatch.setenv(amp.ENV_CPU_BF16, "1")
    warned.clear()
    trainer = build_trainer(cfg, None, CPU, warn=warned.append, log=lambda m: None)
    assert trainer.dtype == torch.bfloat16 and warned == []
