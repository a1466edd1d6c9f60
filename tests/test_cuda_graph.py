"""The CUDA-graph runner: the same detections as the eager model, one graph per
input shape, fresh inputs on every replay, and a model forward that makes no
host sync (what capture needs). The GPU cases skip without one."""

from __future__ import annotations

import pytest
import torch

from ddetr_cli.models import build_model, preset
from ddetr_cli.ops import msda as msda_mod
from ddetr_cli.runtime.cuda_graph import CudaGraphRunner

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and msda_mod.native_supports(torch.device("cuda"))),
                               reason="needs a GPU and a CUDA build")


def test_refuses_a_model_that_is_not_on_cuda():
    model = build_model(preset("tiny")).eval()
    with pytest.raises(ValueError, match="model: CUDA graphs need a model on a CUDA device"):
        CudaGraphRunner(model)


def _batch(seed: int, size=(2, 3, 128, 160)):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(*size, generator=g).cuda()
    mask = torch.zeros(size[0], *size[2:], dtype=torch.bool)
    mask[-1, :, size[3] - 24:] = True  # the last image is padded on the right
    return images, mask.cuda()


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("variant", ["base", "two-stage"])
def test_replay_matches_eager_for_new_inputs_and_shapes(variant):
    from ddetr_cli.models import apply_variant

    torch.manual_seed(0)
    model = build_model(apply_variant(preset("tiny"), variant)).cuda().eval()
    runner = CudaGraphRunner(model)
    for seed, size in ((1, (2, 3, 128, 160)), (2, (2, 3, 128, 160)), (3, (1, 3, 96, 128)), (4, (2, 3, 128, 160))):
        images, mask = _batch(seed, size)
        got = runner(images, mask)
        with torch.inference_mode():
            want = model(images, mask)
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
    assert len(runner._graphs) == 2  # one graph per input shape


@pytest.mark.cuda
@needs_gpu
def test_outputs_survive_the_next_replay():
    torch.manual_seed(0)
    runner = CudaGraphRunner(build_model(preset("tiny")).cuda().eval())
    first = runner(*_batch(1))
    kept = first["pred_boxes"].clone()
    runner(*_batch(2))
    assert torch.equal(first["pred_boxes"], kept)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("variant", ["base", "refine", "two-stage"])
def test_model_forward_makes_no_host_sync(variant):
    from ddetr_cli.models import apply_variant

    torch.manual_seed(0)
    model = build_model(apply_variant(preset("tiny"), variant)).cuda().eval()
    images, mask = _batch(1)
    with torch.inference_mode():
        model(images, mask)  # first call: caches, cuDNN plans
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(images, mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_torch_runner_ignores_cuda_graph_on_the_cpu():
    from ddetr_cli.engine.loops.runner import TorchRunner

    torch.manual_seed(0)
    model = build_model(preset("tiny")).eval()
    images = torch.randn(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    runner = TorchRunner(model, "cpu", cuda_graph=True)
    assert runner.graphed is None
    with torch.inference_mode():
        want = model(images, mask)
    torch.testing.assert_close(runner(images, mask)["pred_boxes"], want["pred_boxes"])


@pytest.mark.cuda
@needs_gpu
def test_torch_runner_with_cuda_graph_matches_eager_in_bf16():
    from ddetr_cli.engine.loops.runner import TorchRunner

    torch.manual_seed(0)
    model = build_model(preset("tiny")).cuda().eval()
    eager, graphed = TorchRunner(model, "cuda", amp="bf16"), TorchRunner(model, "cuda", amp="bf16", cuda_graph=True)
    for seed in (1, 2):
        images, mask = _batch(seed)
        want, got = eager(images, mask), graphed(images, mask)
        torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=2e-2, atol=2e-2)
