"""Placements: where the correction goes relative to the flow ODE, one file each on the
abstract base of `base.py`. The public names are re-exported by `flowcorrect`."""
