"""Runs in the notebook's kernel, the Spark driver: check and plan a job, launch its Spark
jobs, supervise its attempts, serve the channel and the embedded registry."""
