"""Formats shared by the kernel, the Spark tasks and the TF processes: the task plan, the
feed spec, metric events, the channel and the registry protocol. Modules here import
no other part of tfos_magic (but `errors`), nor Spark, nor TensorFlow."""
