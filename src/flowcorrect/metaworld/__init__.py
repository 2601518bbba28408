"""The Meta-World harness: does correction make a policy succeed more?

Scripted demonstrations, a small flow-matching policy over action chunks, energies,
and a batched, paired closed-loop evaluation of every sampler setting, with exact
McNemar p-values. Meta-World is imported lazily, only by the functions that need it:
install it with `pip install 'flowcorrect[metaworld]'`. The statistics
(`flowcorrect.metaworld.stats`) need no simulator.
"""

from ._require import INSTALL_HINT as INSTALL_HINT, require_metaworld as require_metaworld
