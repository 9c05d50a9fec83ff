"""`python -m experiments.mnist_cnn`."""

from experiments.mnist_cnn.cli import main

main()
