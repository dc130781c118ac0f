"""Model packages: an exported model, the training artifacts derived from it, and a manifest."""
