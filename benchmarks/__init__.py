"""flowcorrect's benchmarks: `python -m benchmarks --help` (from the repository root).

- `harness`: compiling, timing (round-robin, synchronised), memory and FLOP counting;
- `report`: the table, the JSON record and the plot;
- `overhead`: what each correction placement adds to a Pi0-shaped policy's sampler
  (and to openpi's own Pi0 where openpi is importable: `openpi_pi0`), and the
  reference's way of doing the same (`python -m benchmarks` runs its quick set);
- `training`: `fc.train.fit` against a hand-written training loop
  (`python benchmarks/training.py`).
"""
