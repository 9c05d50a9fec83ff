"""`python -m experiments.lp_toy`."""

from experiments.lp_toy.cli import main

main()
