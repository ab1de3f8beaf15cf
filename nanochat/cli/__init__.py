"""Command-line entry points and the argument/exit-code style they share."""
