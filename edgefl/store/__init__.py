"""State and blob stores behind the interfaces in ``edgefl.store.base``."""

from edgefl.store.base import BlobStore, ModelRecord, RoundRecord, SessionRecord, Store


def make_store(url: str) -> Store:
    """Open the state store for a SQLAlchemy URL (sqlite:///path.db, postgresql://...)."""
    from edgefl.store.sql import SqlStore

    return SqlStore(url)


__all__ = ["BlobStore", "ModelRecord", "RoundRecord", "SessionRecord", "Store", "make_store"]
