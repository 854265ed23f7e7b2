"""postlab.configs."""
