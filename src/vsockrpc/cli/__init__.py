"""Command-line interface: argument parsing, exit codes and human output only.

Each subcommand module exposes ``register(subparsers)``; handlers take the parsed namespace and
return an exit code. Logic a library user would need lives in the layers below.
"""
