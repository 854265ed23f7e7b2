"""postlab.decode."""
