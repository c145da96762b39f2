"""profiling-agent: a host-resident continuous profiling agent (BCC eBPF -> pprof / OTLP profiles)."""

__version__ = "0.1.0"
