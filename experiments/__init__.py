"""Named experiments: the paper's table, sweeps, plots."""
