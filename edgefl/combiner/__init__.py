"""Regional combiner: aggregates its region's updates as they stream in."""

from edgefl.combiner.combiner import Combiner, CombinerConfig

__all__ = ["Combiner", "CombinerConfig"]
