"""Ways to run a loaded model other than a plain eager PyTorch call, each
behind the model's own call shape ``(images, padding_mask) -> {"pred_logits",
"pred_boxes"}``:

* :class:`.cuda_graph.CudaGraphRunner`: a PyTorch model replayed from a CUDA
  graph captured per input shape (``ddetr predict --cuda-graph``, the bench's
  CUDA-graph row);
* :class:`.onnx.OnnxRunner`: an exported ``.onnx`` graph run by onnxruntime
  (an optional extra), with the class names and preprocessing read from its
  metadata.

Neither chooses itself: :func:`ddetr_cli.engine.loops.runner.load_runner` is
the one place that turns a ``weights`` value into a runner.
"""
