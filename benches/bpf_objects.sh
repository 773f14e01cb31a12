# Sourced by the per-probe cost harnesses (benches/*/cost.sh): one build of a probe's eBPF
# object per revision, compiled as ebpf/build.rs compiles it, so that builds can be compared
# side by side in one run.
#
#   build_objects PROBE WORK REPO REV...
#     PROBE  the object's name: ebpf/src/bpf/PROBE.bpf.c
#     REV    a git revision, `.` for the working tree, or the path of a variant PROBE.bpf.c
#            (built with the working tree's headers)
#   Sets OBJS to the objects' paths (WORK/PROBE<i>.o), in the order of the revisions.
build_objects() {
    local probe=$1 work=$2 repo=$3
    shift 3
    local revs=("$@") i src
    OBJS=()
    for i in "${!revs[@]}"; do
        src="$work/src$i"
        mkdir -p "$src"
        if [ "${revs[$i]}" = . ] || [[ "${revs[$i]}" == *.bpf.c ]]; then
            mkdir -p "$src/src"
            cp -r "$repo/ebpf/src/bpf" "$src/src/"
            cp -r "$repo/ebpf/include" "$src/"
            [ "${revs[$i]}" = . ] || cp "${revs[$i]}" "$src/src/bpf/$probe.bpf.c"
        else
            git -C "$repo" archive "${revs[$i]}" ebpf/src/bpf ebpf/include | tar -x -C "$src" --strip-components=1
        fi
        clang-19 -g -O2 -target bpf -Wall -D__TARGET_ARCH_x86 -I "$src/include/x86_64" -I "$src/src/bpf" \
            -c "$src/src/bpf/$probe.bpf.c" -o "$work/$probe$i.o"
        llvm-strip-19 -g "$work/$probe$i.o"
        OBJS+=("$work/$probe$i.o")
    done
}
