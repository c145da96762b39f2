"""Unwind stage test helpers: a small x86-64 shared object whose CFI is written by hand, and its labels.

Every label of interest is a local symbol, so the `call`s between the functions bind directly (no PLT)
and `.symtab` names each address. The comment after each CFI directive gives the rule it makes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

UNWIND_ASM = r"""
	.text
text_start:                     # no FDE covers these two bytes
	nop
	nop

fp_func:                        # a frame-pointer function with an early `leave; ret` epilogue
	.cfi_startproc              # CFA rsp+8, ra at CFA-8 (the CIE)
	push %rbp
fp_pushed:
	.cfi_def_cfa_offset 16      # CFA rsp+16
	.cfi_offset %rbp, -16       # caller's rbp at CFA-16
	mov %rsp, %rbp
fp_framed:
	.cfi_def_cfa_register %rbp  # CFA rbp+16: frame-pointer based
	call leaf_func
fp_ret:
	test %eax, %eax
	jz 1f
	.cfi_remember_state
	leave
fp_early_leave:
	.cfi_def_cfa %rsp, 8        # CFA rsp+8
	.cfi_restore %rbp           # rbp as at entry (unchanged)
	ret
1:
fp_after_early:
	.cfi_restore_state          # back to CFA rbp+16, rbp at CFA-16
	nop
	pop %rbp
fp_popped:
	.cfi_def_cfa %rsp, 8        # CFA rsp+8, rbp rule kept (CFA-16)
	ret
	.cfi_endproc

fp_noreturn:                    # ends with a call that does not return: its return address is leaf_func
	.cfi_startproc
	push %rbp
fp_noreturn_pushed:
	.cfi_def_cfa_offset 16
	.cfi_offset %rbp, -16
	mov %rsp, %rbp
fp_noreturn_framed:
	.cfi_def_cfa_register %rbp
	call leaf_func
	.cfi_endproc

leaf_func:                      # frameless, starting right where fp_noreturn ends
	.cfi_startproc
	sub $24, %rsp
leaf_subbed:
	.cfi_adjust_cfa_offset 24   # CFA rsp+32
	nop
leaf_args_size:
	.cfi_escape 0x2e, 0x10      # DW_CFA_GNU_args_size 16: no effect on the rule
	nop
	add $24, %rsp
leaf_added:
	.cfi_adjust_cfa_offset -24  # CFA rsp+8
	ret
	.cfi_endproc

outer_func:                     # the outermost frame, as _start
	.cfi_startproc
	.cfi_undefined rip          # no return address
	xor %ebp, %ebp
	call fp_func
outer_ret:
	hlt
	.cfi_endproc

gap_start:                      # 16 bytes between two FDEs
	.skip 16, 0xcc

expr_func:                      # a CFA computed by an expression, as in PLT stubs
	.cfi_startproc
	nop
expr_body:
	.cfi_escape 0x0f, 0x03, 0x77, 0x08, 0x06  # DW_CFA_def_cfa_expression: DW_OP_breg7 8; DW_OP_deref
	nop
	ret
	.cfi_endproc

escape_func:                    # the signed-offset forms and rules this unwinder cannot follow
	.cfi_startproc
	nop
escape_def_cfa_sf:
	.cfi_escape 0x12, 0x07, 0x7c  # DW_CFA_def_cfa_sf rsp, -4 * data factor -8: CFA rsp+32
	nop
escape_offset_sf:
	.cfi_escape 0x11, 0x06, 0x02  # DW_CFA_offset_extended_sf rbp, 2 * -8: rbp at CFA-16
	nop
escape_rbp_in_rbx:
	.cfi_register %rbp, %rbx    # the caller's rbp is in rbx: lost to this unwinder
	nop
escape_cfa_rbx:
	.cfi_def_cfa %rbx, 16       # CFA rbx+16: unsupported
	nop
	ret
	.cfi_endproc

ra_reg_func:                    # the return address kept in a register
	.cfi_startproc
	nop
ra_reg_body:
	.cfi_register rip, rax
	nop
	ret
	.cfi_endproc
text_end:                       # after the last FDE
	nop
	.section .note.GNU-stack,"",@progbits
"""

# Functions with an FDE, and those of them that set up an rbp-based CFA.
FDE_FUNCTIONS = ("fp_func", "fp_noreturn", "leaf_func", "outer_func", "expr_func", "escape_func", "ra_reg_func")
FRAME_POINTER_FUNCTIONS = ("fp_func", "fp_noreturn")


def require_toolchain() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the unwind test library from assembly")


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def build_library(directory: Path, name: str, *, debug_frame: bool = False, linker_script: Path | None = None) -> Path:
    """UNWIND_ASM built with `gcc -shared -nostdlib`: CFI in .eh_frame, or in .debug_frame on request."""
    source = directory / f"{name}.S"
    source.write_text(("\t.cfi_sections .debug_frame\n" if debug_frame else "") + UNWIND_ASM)
    output = directory / f"{name}.so"
    extra = ["-Wl,-T," + str(linker_script)] if linker_script is not None else []
    _run("gcc", "-shared", "-nostdlib", *extra, "-o", str(output), str(source))
    return output


def unaligned_text_script(directory: Path) -> Path:
    """A GNU ld script that lays a shared object out as lld does: the executable PT_LOAD starts mid-page.

    ld's default script page-aligns the text; this one keeps its file offset and puts it at the same
    offset within the next page, so the segment's p_offset (e.g. 0x299) is not page aligned and the
    loader maps it from file offset 0.
    """
    if shutil.which("ld") is None:
        pytest.skip("GNU ld is needed to write the lld-like linker script")
    listing = _run("ld", "--verbose", "-shared", "-z", "separate-code")
    lines = listing.split("=" * 50)[1].splitlines()[1:]
    aligned = "  . = ALIGN(CONSTANT (MAXPAGESIZE));"
    if aligned not in lines:
        pytest.skip("this ld's default script has no page alignment before .text to change")
    lines[lines.index(aligned)] = "  . = ALIGN(CONSTANT (MAXPAGESIZE)) + (. & (CONSTANT (MAXPAGESIZE) - 1));"
    script = directory / "unaligned_text.ld"
    script.write_text("\n".join(lines) + "\n")
    return script


def symbol_addresses(path: Path) -> dict[str, int]:
    """{name: link-time address} of every symbol in `.symtab`."""
    with open(path, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        return {symbol.name: symbol["st_value"] for symbol in symtab.iter_symbols() if symbol.name}
