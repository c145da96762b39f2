"""Symbolize stage: raw addresses to named frames (`symbolizer`): kernel symbols, native ELF symbols and
debug files, JIT perf maps, marker frames.
"""
