/* Ingest benchmark driver (a shared library): hands N records to a callback the way libbcc's perf
 * reader does, through a `void (*)(void *cookie, void *raw, int size)` raw callback, so the benchmark
 * pays the same ctypes trampoline per record as the agent's perf-buffer thread. */
typedef void (*raw_cb)(void *cookie, void *raw, int size);

void drive(raw_cb cb, void *cookie, char *blob, const long *offsets, const int *sizes, long first, long count)
{
    for (long i = first; i < first + count; i++)
        cb(cookie, blob + offsets[i], sizes[i]);
}
