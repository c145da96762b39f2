"""Export stage, OTLP sink: profiles as OTLP profiles (v1development, proto v1.10.0) over gRPC.

Modules, by concern: `config` (the `export.otlp` section), `encode` with `dictionary`, `shapes`,
`resource` and `fileid` (Profile -> ExportProfilesServiceRequest), `exporter` with `retry` (the gRPC
client), `spool` (the durable queue), `sink` (`OtlpSink`, the Sink the daemon drives) and `stats`.
"""

from agent.export.otlp.config import OtlpConfig
from agent.export.otlp.encode import encode_request
from agent.export.otlp.resource import ResourceOptions
from agent.export.otlp.sink import OtlpSink

__all__ = ["OtlpConfig", "OtlpSink", "ResourceOptions", "encode_request"]
