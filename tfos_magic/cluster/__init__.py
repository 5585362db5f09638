"""Starting the TF cluster on Spark: barrier tasks that feed TF worker processes."""
