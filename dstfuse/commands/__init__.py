"""The `dstfuse` subcommands, one module each (see dstfuse/cli.py)."""
