"""Process stage (stage-neutral): what the agent knows of processes and their files, read by the probes,
the unwind and the symbolize stages: mappings (`maps`), ELF symbols, build ids and CFI sections (`elf`),
the vDSO (`vdso`), bounded caches (`cache`) and the process registry (`registry`).
"""
