"""The `tfos` command line: run notebooks headless, run stored jobs without a notebook,
and read the job store from a shell. Built on the job API (`tfos_magic.api`) and the
job store, never on the magics, so it needs no kernel of its own.

Runs in the user's shell process; for `tfos submit` that process is the Spark driver.
"""

INTERRUPTED = 130  # the exit status a shell reports for a command ended by Ctrl-C (128 + SIGINT)
