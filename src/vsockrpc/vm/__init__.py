"""vm layer (see ARCHITECTURE in README)."""
