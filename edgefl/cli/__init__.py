"""The `edgefl` command line."""
