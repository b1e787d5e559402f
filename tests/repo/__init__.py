"""The repository itself: the import layering, the installed distribution, the temporary-folder hooks."""
