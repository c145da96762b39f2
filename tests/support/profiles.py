"""Read the agent's gzipped pprof files back into plain records the tests can assert on."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

from agent._proto import profile_pb2


@dataclass(frozen=True)
class ReadSample:
    functions: tuple[str, ...]  # leaf first
    mappings: tuple[str, ...]  # each frame's mapping file name ("" for none), parallel to functions
    values: tuple[int, ...]
    numeric: dict[str, int]
    strings: dict[str, str]


def read_pprof(path: Path) -> tuple[profile_pb2.Profile, list[ReadSample]]:
    profile = profile_pb2.Profile()
    profile.ParseFromString(gzip.decompress(path.read_bytes()))
    strings = profile.string_table
    functions = {f.id: strings[f.name] for f in profile.function}
    mappings = {m.id: strings[m.filename] for m in profile.mapping}
    locations = {loc.id: loc for loc in profile.location}
    samples = []
    for sample in profile.sample:
        names = []
        files = []
        for location_id in sample.location_id:
            location = locations[location_id]
            names.append(functions[location.line[0].function_id] if location.line else "")
            files.append(mappings.get(location.mapping_id, ""))
        samples.append(
            ReadSample(
                functions=tuple(names),
                mappings=tuple(files),
                values=tuple(sample.value),
                numeric={strings[label.key]: label.num for label in sample.label if not label.str},
                strings={strings[label.key]: strings[label.str] for label in sample.label if label.str},
            )
        )
    return profile, samples


def read_all(directory: Path, prefix: str = "cpu") -> list[ReadSample]:
    samples: list[ReadSample] = []
    for path in sorted(directory.glob(f"{prefix}-*.pb.gz")):
        samples += read_pprof(path)[1]
    return samples


def samples_of(samples: list[ReadSample], pid: int) -> list[ReadSample]:
    return [sample for sample in samples if sample.numeric.get("pid") == pid]
