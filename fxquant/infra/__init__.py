"""Layer 4, pass infrastructure: ``Pass``, ``PassContext``, the ``PassManager`` that checks a
pipeline against its passes' contracts (``contracts``: typed graph properties) and runs it
with instruments, the neutrality check (``neutrality``), and the records (``PassRecord``,
``Report``) it fills."""
