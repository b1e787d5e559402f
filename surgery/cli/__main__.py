"""`python -m surgery.cli`: the vit-surgery command line."""
import sys

from .main import main

sys.exit(main())
