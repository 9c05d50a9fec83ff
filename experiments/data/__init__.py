"""The experiments' data sets: the UCI gas sensor array drift set (`gas_sensor`, NumPy) and
MNIST through TensorFlow Datasets (`mnist`)."""
