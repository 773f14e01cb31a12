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

# The http probe's hooks with nothing in them: writes to OUT the working tree's http.bpf.c with
# the per-syscall tracepoint programs' bodies removed (the two statements of its EXIT_/
# ENTER_TRACEPOINT macros), so each is `return 0` on the same tracepoint, with the same maps
# and names. Loaded instead of the probe, it measures what any program on these hooks pays
# before it does any work. Sets HTTP_TRACEPOINT_PROGRAMS to the programs' names, read from the
# source so that the list follows the probe.
#
#   http_empty_hooks REPO OUT
http_empty_hooks() {
    local source="$1/ebpf/src/bpf/http.bpf.c" out=$2
    mapfile -t HTTP_TRACEPOINT_PROGRAMS < <(sed -n \
        -e 's/^EXIT_TRACEPOINT(\([a-z0-9]*\),.*/podscope_http_exit_\1/p' \
        -e 's/^ENTER_TRACEPOINT(\([a-z0-9]*\),.*/podscope_http_enter_\1/p' "$source")
    # The helpers the bodies called are left unused: expected, so not warned about.
    {
        echo '#pragma clang diagnostic ignored "-Wunused-function"'
        sed -e '/if (exit_matters(nr, ctx->ret))/d' -e '/exit_with_regs(nr, ctx->ret);/d' \
            -e '/on_enter(nr, ctx->args\[0\], ctx->args\[1\], ctx->args\[2\]);/d' "$source"
    } > "$out"
}

# Fails unless every program of PROGRAM... in OBJECT is the two instructions of `return 0`
# (checks that http_empty_hooks' object is a floor, should the macros change).
#
#   check_empty_programs OBJECT PROGRAM...
check_empty_programs() {
    local object=$1 program size
    shift
    for program in "$@"; do
        size=$(llvm-objdump-19 -d --no-show-raw-insn "$object" |
            awk -v p="<$program>:" '$2 == p { on = 1; next } on && /^$/ { on = 0 } on && NF { n++ } END { print n + 0 }')
        [ "$size" = 2 ] || { echo "$program has $size instructions in $object, expected 2 (return 0)" >&2; return 1; }
    done
}

# The http probe without its ring buffer: writes to OUT the working tree's http.bpf.c whose
# submit() bumps a per-CPU counter (http_counters' spare slots 2 and 3) instead of querying the
# ring and writing the event. Everything before it (hooks, lookups, clock, user reads, the event
# built in scratch) stays: what a design that kept RED counts in the kernel and sent nothing up
# for unsampled requests would still pay, about. Fails if submit() no longer has the lines.
#
#   http_without_ring_buffer REPO OUT
http_without_ring_buffer() {
    local source="$1/ebpf/src/bpf/http.bpf.c" out=$2
    awk '
        /__u64 size = offsetof\(struct http_event, data\) \+ captured;/ { skipping = 1; replaced++ }
        skipping && /count\(HTTP_COUNTER_EVENTS_LOST\);/ {
            print "\tcount(2 + (e->head.kind & 1)); /* bench variant: no ring buffer */"
            skipping = 0; next
        }
        !skipping { print }
        END { if (replaced != 1 || skipping) exit 1 }' "$source" > "$out" ||
        { echo "http.bpf.c: submit() is not as http_without_ring_buffer expects" >&2; return 1; }
}

# Starts benches/http_state/loader.c's binary LOADER on OBJECT (the programs PROGRAM...
# attached, output in OUT) and returns once it counts, i.e. after its "begun" line; sets
# LOADER_PID. Stop it with SIGTERM, then read OUT.
#
#   start_http_loader LOADER OBJECT PORT OUT PROGRAM...
start_http_loader() {
    local loader=$1 object=$2 port=$3 out=$4
    shift 4
    # A fresh file each time: the old one's "ready" must not be read before the redirection.
    rm -f "$out"
    "$loader" "$object" "$port" "$@" > "$out" &
    LOADER_PID=$!
    until grep -q ready "$out" 2> /dev/null; do
        kill -0 "$LOADER_PID" 2> /dev/null || { echo "$object did not load" >&2; return 1; }
        sleep 0.05
    done
    # The loader counts from SIGUSR1, and SIGTERM ends it only after that.
    kill -USR1 "$LOADER_PID"
    until grep -q begun "$out"; do sleep 0.01; done
}
