"""`python -m hpcprune ...` is the same as the `hpcprune` console script."""

from hpcprune.cli import main

main()
