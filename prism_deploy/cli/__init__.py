"""Command-line layer: argument parsing, tables and JSON output, exit codes."""
