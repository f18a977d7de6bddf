"""vhost layer (see ARCHITECTURE in README)."""
