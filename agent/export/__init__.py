"""Export stage: the sinks a finished profile goes to: local pprof files (`files`) and OTLP (`otlp`),
behind the `Sink` protocol (`sink`).
"""
