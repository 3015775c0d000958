"""convgap."""
