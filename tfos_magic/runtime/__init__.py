"""What runs inside an executor: the TF child process, its context and callbacks."""
