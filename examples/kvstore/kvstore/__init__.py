"""kvstore: a small key-value store served from inside a vsockrpc guest (see ../README.md)."""
