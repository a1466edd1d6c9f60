"""The three loops: train (with its step), evaluate, predict (with the model
runners it drives). They use the parts, the runs and the reports below them."""
