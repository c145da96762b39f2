"""Process stage: reading CPython from outside the process: per-version layouts (`layouts`), finding the
interpreter and its symbols in a process (`discover`), strings, bytes and code objects (`objects`), line
tables (`linetable`) and the bounded cache of code objects (`code_cache`). Threads and the validation walk
(`threads`, `inspect`) build on these.
"""
