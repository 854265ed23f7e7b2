"""postlab.sae."""
