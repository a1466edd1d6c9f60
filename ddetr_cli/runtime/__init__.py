"""Ways to run a loaded model other than a plain eager call: a CUDA-graph replay."""
