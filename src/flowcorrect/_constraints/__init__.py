"""Hard constraints on action chunks: projections, violations and the placements that
use them."""
