"""From a Spark DataFrame to tf.data, in Arrow all the way.

Driver side (`columns`): check and cast the columns, no Spark job.
Executor side (`arrow_feed`): stream, spill and rebatch Arrow batches into tf.data.
"""
