"""docs/api.md lists every route of the REST API, and nothing else.

The table is what a client author reads instead of the source, so a route added without a
line there (or a line left for a route that went) fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgefl.api.app import create_app
from edgefl.store import make_store

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_api_doc_lists_exactly_the_served_routes(tmp_path) -> None:
    store = make_store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        spec = create_app(store, None, insecure=True).openapi()
    finally:
        store.close()
    served = {(m.upper(), path) for path, ops in spec["paths"].items() for m in ops}
    documented = set(re.findall(r"^\| `([A-Z]+)` \| `(/api[^`]*)` \|", DOC.read_text(), re.M))
    assert len(served) >= 30
    assert documented - served == set(), "documented routes the server does not have"
    assert served - documented == set(), "routes missing from docs/api.md"
