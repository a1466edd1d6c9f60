"""What a run is made of, below the loops: the run folder (one naming for
train and predict), checkpoint files, RNG state, the time budget, and the
assembly of a run's model and datasets from its configs."""
