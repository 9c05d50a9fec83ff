"""The per-batch record's arithmetic: batch values from Keras' running means, trailing means,
the penalty, and the steps until a threshold (NumPy only)."""

import numpy as np

from experiments.common import curves


def batch_values_from_running_means(means):
    """The per-batch values of one epoch from Keras' running means over equal-size batches:
    value_k = (k + 1) m_k - k m_{k-1} (k from 0)."""
    means = np.asarray(means, dtype=np.float64)
    k = np.arange(means.size, dtype=np.float64)
    previous = np.concatenate([[0.0], means[:-1]])
    return (k + 1) * means - k * previous


def running_mean(values, window):
    """Trailing mean over `window` values (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def batch_penalty(record):
    """Each batch's penalty: its full loss minus its cross-entropy (the arm's own penalty)."""
    return np.asarray(record["batch_loss"]) - np.asarray(record["batch_cross_entropy"])


def steps_to_threshold(values, threshold, window, sustained=True):
    """Steps (1-based) until the trailing mean over the full `window` batches n - window + 1 .. n
    is <= threshold: the first n from which it stays so at every later step (`sustained`, the
    `experiments.common.curves` rule), or the first n at which it is; None if never."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < window:
        return None
    means = running_mean(values, window)[window - 1 :]
    steps = np.arange(window, values.size + 1)
    return (curves.sustained_crossing if sustained else curves.first_crossing)(steps, means, threshold)
