"""Layer 4, pass infrastructure: ``Pass``, ``PassContext``, the ``PassManager`` that checks a
pipeline and runs it with instruments, and the records (``PassRecord``, ``Report``) it fills."""
