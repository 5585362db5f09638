"""Runs in a Spark task on an executor: agree the TF cluster with the peer tasks, start
the task's TF process and stream its partition into it as Arrow IPC."""
