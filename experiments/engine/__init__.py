"""The experiments' full-batch engine: many linear chains trained in one compiled TensorFlow
loop (`fullbatch`), and the optimizer updates it applies to their factors (`update_rules`)."""
