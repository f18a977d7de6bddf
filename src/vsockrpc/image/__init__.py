"""image layer (see ARCHITECTURE in README)."""
