#!/usr/bin/env python3
"""Writes containerd's RuntimeDefault seccomp profile for one container as a JSON file podman
and runc accept, by reading containerd's own definition of it.

containerd builds that profile in Go (contrib/seccomp/seccomp_default.go, DefaultProfile): a base
allow list, rules by kernel version and CPU architecture, rules added for each capability in the
container's bounding set (`bpf` for CAP_BPF, `perf_event_open` for CAP_PERFMON, …) and clone
restrictions without CAP_SYS_ADMIN. No JSON of it is published, and printing it with containerd's
code needs a Go toolchain and module downloads this machine does not have; so this script reads
that Go file and evaluates the function for amd64, a kernel >= 4.8 and the given capabilities.
It understands only the shapes that file uses and fails loudly on anything else.

    scripts/seccomp-from-containerd.py SECCOMP_DEFAULT_GO OUT.json CAP_BPF CAP_PERFMON ...

The profiles the image test uses (helm/podscope/tests/seccomp/) were written by it; their
README names the containerd release and commit.
"""

import json
import re
import sys

LINUX_SCHED_H = "/usr/include/linux/sched.h"
ARCHES = {"ArchX86_64": "SCMP_ARCH_X86_64", "ArchX86": "SCMP_ARCH_X86", "ArchX32": "SCMP_ARCH_X32"}
OPS = {"OpNotEqual": "SCMP_CMP_NE", "OpLessThan": "SCMP_CMP_LT", "OpLessEqual": "SCMP_CMP_LE",
       "OpEqualTo": "SCMP_CMP_EQ", "OpGreaterEqual": "SCMP_CMP_GE", "OpGreaterThan": "SCMP_CMP_GT",
       "OpMaskedEqual": "SCMP_CMP_MASKED_EQ"}
ACTIONS = {"ActAllow": "SCMP_ACT_ALLOW", "ActErrno": "SCMP_ACT_ERRNO"}
# x86_64 values of the constants the file names (linux/socket.h, asm-generic/errno.h); the
# CLONE_* flags are read from the kernel headers.
CONSTANTS = {"AF_ALG": 38, "AF_VSOCK": 40, "ENOSYS": 38}


def constants():
    found = dict(CONSTANTS)
    with open(LINUX_SCHED_H) as f:
        for name, value in re.findall(r"#define\s+(CLONE_[A-Z_]+)\s+(0x[0-9a-fA-F]+)", f.read()):
            found[name] = int(value, 16)
    return found


def value_of(expr, known):
    """An integer expression of literals, unix.X constants, `|` and `+`."""
    total, op = None, None
    for token in re.findall(r"0x[0-9a-fA-F]+|\d+|unix\.[A-Z_0-9]+|[|+]", expr):
        if token in "|+":
            op = token
            continue
        value = known[token[5:]] if token.startswith("unix.") else int(token, 0)
        total = value if total is None else (total | value if op == "|" else total + value)
    if total is None:
        raise SystemExit(f"cannot evaluate {expr!r}")
    return total


def block(text, start):
    """The text inside the braces opening at or after `start`, and the index after them."""
    open_at = text.index("{", start)
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1:i], i + 1
    raise SystemExit("unbalanced braces")


def elements(body):
    """The top-level `{…}` elements of a composite literal's body."""
    out, i = [], 0
    while True:
        j = body.find("{", i)
        if j < 0:
            return out
        inner, i = block(body, j)
        out.append(inner)


def syscall_rule(literal, known):
    names_body, _ = block(literal, literal.index("Names:"))
    rule = {"names": re.findall(r'"([a-z0-9_]+)"', names_body)}
    rule["action"] = ACTIONS[re.search(r"Action:\s*specs\.(\w+)", literal).group(1)]
    errno = re.search(r"ErrnoRet:\s*&(\w+)", literal)
    if errno:
        rule["errnoRet"] = known[errno.group(1)]
    if "Args:" in literal and not re.search(r"Args:\s*\[\]specs\.LinuxSeccompArg\{\}", literal):
        args_body, _ = block(literal, literal.index("Args:") + len("Args: []specs.LinuxSeccompArg"))
        rule["args"] = []
        for arg in elements(args_body):
            fields = dict(re.findall(r"(\w+):\s*([^,\n]+),", arg))
            rule["args"].append({
                "index": int(fields["Index"]),
                "value": value_of(fields["Value"], known),
                "valueTwo": value_of(fields.get("ValueTwo", "0"), known),
                "op": OPS[fields["Op"].strip().removeprefix("specs.")],
            })
    return rule


def appended(text, known):
    """Rules of every `s.Syscalls = append(s.Syscalls, specs.LinuxSyscall{…})` in `text`."""
    rules, i = [], 0
    marker = "append(s.Syscalls, specs.LinuxSyscall"
    while (j := text.find(marker, i)) >= 0:
        literal, i = block(text, j)
        rules.append(syscall_rule(literal, known))
    return rules


def case_body(switch_body, label):
    """The statements of `case <label>:` (a label among the case's list) in a switch body."""
    cases = re.split(r"\n\s*(case [^\n]*:|default:)\n", switch_body)
    for head, body in zip(cases[1::2], cases[2::2]):
        if head == "default:" and label == "default" or f'"{label}"' in head:
            return body
    return ""


def profile(source, caps):
    known = constants()
    known["nosys"] = known["ENOSYS"]
    function = source[source.index("func DefaultProfile("):]
    base, after = block(function, function.index("syscalls := []specs.LinuxSyscall"))
    rules = [syscall_rule(e, known) for e in elements(base)]
    rest = function[after:]
    # Kernel >= 4.8: this machine and every kernel podscope supports.
    kernel, _ = block(rest, rest.index("kernelversion.GreaterEqualThan("))
    kernel_ok, _ = block(rest, rest.index("if ok {"))
    rules += appended(kernel_ok, known)
    arch_switch, _ = block(rest, rest.index("switch runtime.GOARCH {"))
    rules += appended(case_body(arch_switch, "amd64"), known)
    cap_switch, _ = block(rest, rest.index("switch c {"))
    for cap in caps:
        rules += appended(case_body(cap_switch, cap), known)
    if "CAP_SYS_ADMIN" not in caps:
        not_admin, _ = block(rest, rest.index("if !admin {"))
        inner_switch, inner_end = block(not_admin, not_admin.index("switch runtime.GOARCH {"))
        rules += appended(case_body(inner_switch, "default"), known)
        rules += appended(not_admin[inner_end:], known)
    arches = re.search(r'case "amd64":\s*return \[\]specs\.Arch\{([^}]*)\}', source).group(1)
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": [ARCHES[a.strip().removeprefix("specs.")] for a in arches.split(",")],
        "syscalls": rules,
    }


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        result = profile(f.read(), argv[3:])
    with open(argv[2], "w") as out:
        json.dump(result, out, indent=1)
        out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
