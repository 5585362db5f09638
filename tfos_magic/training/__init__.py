"""Runs in the TF process a Spark task starts, one per task attempt: the Arrow feed into
tf.data, the user's cell, the strategy, checkpoints and metric events."""
