"""Training the energy model: InfoNCE, negatives, the fit loop, checkpoints, reports."""
