"""guest layer (see ARCHITECTURE in README)."""
