"""services layer (see ARCHITECTURE in README)."""
