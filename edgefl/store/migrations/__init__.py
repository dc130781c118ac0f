"""Alembic migrations of the SQL state store, shipped in the package (see ``edgefl.store.schema``).

``env.py`` runs them on the connection that ``edgefl.store.schema.upgrade`` hands over; each
revision in ``versions/`` also sets ``edgefl_meta.schema_version`` to its ``schema_version``.
"""
