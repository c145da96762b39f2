"""The middle of the house: how items flow between the stages' threads.

`queue` is the bounded, drop-oldest hand-off from the perf-buffer reader to the pipeline thread;
`pipeline` routes each event through the process registry, the filters, the keep decision, the unwind
stage (for records not unwound in the reader) and aggregation; `report` takes each finished interval
through symbolization, the pprof builder and the sinks; `sinks` builds the local file sink. Nothing
here starts a thread: `agent.daemon` runs these on the threads it owns.
"""
