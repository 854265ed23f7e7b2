"""postlab.align."""
