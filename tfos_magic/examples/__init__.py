"""Data for the examples: small, real-looking datasets that run in the kernel (the Spark driver),
so a notebook can show a whole job without a download step."""
