"""Building blocks of the loops, each one concept: AMP dtypes, devices,
process groups, EMA, deferred Ctrl-C, class-to-category maps, the optimizer,
the lr schedule and the samplers. Nothing here imports the loops or the runs."""
