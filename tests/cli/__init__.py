"""The command line: each command, its files and messages, exit codes, inspect / eval, a first real model."""
