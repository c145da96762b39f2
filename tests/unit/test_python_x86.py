"""Process stage: the x86-64 decoders (`agent.process.python.x86`) on hand-assembled code.

The real interpreters' functions are checked in test_python_threads; these cover the other forms the
decoder accepts (endbr64, `lea rdi, [rip+d]` of a -fno-semantic-interposition build, the key loaded
through a GOT base) and that anything else is "could not tell" (None), never a guess.
"""

from __future__ import annotations

import struct

from agent.process.python.x86 import SpecificOffsets, pthread_specific_offsets, tss_key_address

VADDR = 0x1000


def _rip(target: int, at: int, length: int) -> bytes:
    """disp32 of an instruction at `at` of `length` bytes reaching `target`."""
    return struct.pack("<i", target - (VADDR + at + length))


def test_lea_rdi_rip_after_endbr64() -> None:
    code = b"\xf3\x0f\x1e\xfa" + b"\x48\x8d\x3d" + _rip(0x5000, 4, 7) + b"\xe9\x00\x00\x00\x00"
    assert tss_key_address(code, VADDR, lambda _: None) == 0x5000


def test_key_field_loaded_through_the_got() -> None:
    # mov rax, [rip+GOT]; mov edi, [rax+0x254]; jmp pthread_getspecific
    got = 0x9000
    code = b"\x48\x8b\x05" + _rip(got, 0, 7) + b"\x8b\xb8" + struct.pack("<i", 0x254) + b"\xe9\0\0\0\0"
    assert tss_key_address(code, VADDR, {got: 0x40000}.get) == 0x40000 + 0x254 - 4


def test_an_unresolved_got_slot_or_a_clobbered_register_tells_nothing() -> None:
    got = 0x9000
    lea = b"\x48\x8d\xb8" + struct.pack("<i", 0x248) + b"\xe9\0\0\0\0"
    assert tss_key_address(b"\x48\x8b\x05" + _rip(got, 0, 7) + lea, VADDR, lambda _: None) is None
    # lea rdi, [rip+d]; xor edi, edi; call: rdi no longer holds the address
    code = b"\x48\x8d\x3d" + _rip(0x5000, 0, 7) + b"\x31\xff" + b"\xe8\0\0\0\0"
    assert tss_key_address(code, VADDR, lambda _: None) is None


def test_unknown_instructions_and_short_code_end_the_scan() -> None:
    assert tss_key_address(b"\xcc" * 16, VADDR, lambda _: None) is None  # int3
    assert tss_key_address(b"\x48\x8d", VADDR, lambda _: None) is None
    assert tss_key_address(b"", VADDR, lambda _: None) is None
    assert tss_key_address(b"\x31\xc0\xc3", VADDR, lambda _: None) is None  # xor eax, eax; ret


def test_pthread_getspecific_offsets() -> None:
    code = (
        b"\x83\xff\x1f\x77\x3b\x89\xf8\x48\x83\xc0\x31\x48\xc1\xe0\x04"
        + b"\x64\x48\x8b\x04\xc5"
        + struct.pack("<i", 0x510)
    )
    assert pthread_specific_offsets(code) == SpecificOffsets(0x310, 0x510)
    assert pthread_specific_offsets(b"\x90" * 64) is None
