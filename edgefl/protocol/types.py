"""The typed vocabulary that crosses layers: weights, specs, participants, rejections, statuses.

Plain ``TypedDict``s and aliases (no pydantic), because the device agent imports this module
too. The wire schemas in ``messages.py`` stay the single source of the fields on the wire;
these types say what those fields hold once decoded.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

# Python 3.9 evaluates module-level aliases at import time: keep them in typing's spelling.
Weights = Dict[str, np.ndarray]
"""Named tensors: a model's parameters, an update, or optimizer state."""

Spec = Dict[str, Tuple[str, Tuple[int, ...]]]
"""name -> (numpy dtype name, shape): what every update of a round must look like."""

WireSpec = List[list]
