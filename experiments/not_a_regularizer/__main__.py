"""`python -m experiments.not_a_regularizer`."""

from experiments.not_a_regularizer.cli import main

main()
