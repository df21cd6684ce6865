"""A seccomp filter for sandboxed model code, built as raw BPF in pure Python.

bubblewrap installs a compiled classic-BPF program passed as `--seccomp FD` just before it
execs the confined command, so the filter binds the code and everything it starts, but not
bwrap's own set-up (which needs mount and unshare). No libseccomp is needed: the program is
a list of `struct sock_filter {u16 code; u8 jt; u8 jf; u32 k;}` over `struct seccomp_data
{int nr; u32 arch; u64 ip; u64 args[6];}`.

What it denies, and why (each with EPERM, so code sees an ordinary OSError):
- namespaces: unshare, setns, clone with any CLONE_NEW* flag. Without this, code dropped to
  an unprivileged uid on the root path can create a user namespace, gain every capability
  inside it and mount filesystems (issue 14). clone3 gets ENOSYS instead, so libc falls back
  to clone, whose flags a classic-BPF filter can inspect (clone3's are behind a pointer).
- mounts: mount, umount2, pivot_root, chroot and the new mount API (open_tree, move_mount,
  fsopen, fsconfig, fsmount, fspick, mount_setattr).
- other processes and the kernel: ptrace, process_vm_readv/writev, keyctl/add_key/
  request_key, bpf, perf_event_open, userfaultfd, io_uring (its operations bypass seccomp),
  module loading, kexec, reboot, swap, acct, quotactl, open_by_handle_at.
- other ABIs: a syscall made under another architecture (x86-32 `int 0x80` on x86-64) or
  through the x32 ABI would be checked against the wrong numbers, so it is denied outright.
"""
from __future__ import annotations

import errno
import os
import struct
from typing import Dict, List, Optional, Tuple

from tepo_jax.tools.sandbox import data_fd

# Syscall numbers: (x86-64, the generic table aarch64 uses), from the kernel's unistd headers.
_SYSCALLS: Dict[str, Tuple[int, int]] = {
    "ptrace": (101, 117), "mount": (165, 40), "umount2": (166, 39), "swapon": (167, 224),
    "swapoff": (168, 225), "reboot": (169, 142), "pivot_root": (155, 41), "chroot": (161, 51),
    "acct": (163, 89), "unshare": (272, 97), "setns": (308, 268), "keyctl": (250, 219),
    "add_key": (248, 217), "request_key": (249, 218), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "open_by_handle_at": (304, 265),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "quotactl": (179, 60), "lookup_dcookie": (212, 18),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
}
_CLONE = (56, 220)
_CLONE3 = (435, 435)
DENIED = tuple(sorted(_SYSCALLS))

# machine -> (AUDIT_ARCH_*, column in the tables above, first number of a foreign ABI or None)
_ARCHES = {"x86_64": (0xC000003E, 0, 0x40000000),   # x32 syscalls have bit 30 set
           "aarch64": (0xC00000B7, 1, None)}

# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET. (CLONE_NEWTIME,
# 0x80, is the exit-signal byte in clone's flags; unshare, which takes it, is denied anyway.)
CLONE_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | \
    0x20000000 | 0x40000000

# classic BPF opcodes
_LD_W_ABS = 0x20          # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15             # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35             # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45            # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06             # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000   # SECCOMP_RET_ALLOW
_RET_ERRNO = 0x00050000   # SECCOMP_RET_ERRNO | errno
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO = 0, 4, 16  # seccomp_data offsets (args are little-endian)


def supported_arch(machine: Optional[str] = None) -> bool:
    return (machine or os.uname().machine) in _ARCHES


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(machine: Optional[str] = None) -> bytes:
    """The compiled filter for `machine` (default: this host). Raises ValueError for an
    architecture without a syscall table here (the caller reports seccomp as missing)."""
    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        raise ValueError(f"no seccomp syscall table for architecture {machine!r}")
    audit_arch, col, foreign_from = _ARCHES[machine]
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    prog: List[bytes] = [_insn(_LD_W_ABS, _OFF_ARCH),
                         _insn(_JEQ_K, audit_arch, jt=1),   # our arch: skip the deny
                         _insn(_RET_K, eperm),
                         _insn(_LD_W_ABS, _OFF_NR)]
    if foreign_from is not None:
        prog += [_insn(_JGE_K, foreign_from, jf=1), _insn(_RET_K, eperm)]
    for name in DENIED:
        prog += [_insn(_JEQ_K, _SYSCALLS[name][col], jf=1), _insn(_RET_K, eperm)]
    prog += [_insn(_JEQ_K, _CLONE3[col], jf=1), _insn(_RET_K, enosys),
             # clone: deny when any namespace flag is set in the low word of args[0]
             _insn(_JEQ_K, _CLONE[col], jf=3),
             _insn(_LD_W_ABS, _OFF_ARG0_LO),
             _insn(_JSET_K, CLONE_NS_FLAGS, jf=1),
             _insn(_RET_K, eperm),
             _insn(_RET_K, _RET_ALLOW)]
    return b"".join(prog)


def program_fd(program: bytes) -> int:
    """An fd holding `program` at offset 0, for `bwrap --seccomp FD` (bwrap reads to EOF)."""
    return data_fd(program, "tepo-seccomp")
