"""Runs in the notebook's kernel: what a user sees of a job (the live dashboard, the text
progress for terminals, and the static summary a saved notebook keeps)."""
