"""rpc layer (see ARCHITECTURE in README)."""
