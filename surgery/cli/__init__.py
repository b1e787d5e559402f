"""The `vit-surgery` command line: main.py (parser, find/convert/check/demo), export.py (export to the
registered formats), report.py (inspect, eval), args.py (argument types shared by the subcommands), checks.py (the checks that
answer before torch is imported).
Imports nothing heavy: the parser answers `--help` without loading torch."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
