"""Thin command-line entry points; each module exposes ``main(argv=None) -> int``."""
