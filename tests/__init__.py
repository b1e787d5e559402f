"""vit-surgery tests, one folder per subject (docs/contributing/testing.md lists them); shared code in tests/helpers/."""
