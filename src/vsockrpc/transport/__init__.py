"""transport layer (see ARCHITECTURE in README)."""
