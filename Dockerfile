# podscope's container image: the agent binary on a small base, nothing else. scripts/image.sh
# builds the same image without Docker from a binary built here (FROM scratch + the binary's
# shared libraries), and scripts/test-helm.sh runs that one as the chart's container: keep the
# binary path, user, entrypoint, command and ports of the two equal.
#
#   docker build -t <registry>/podscope:0.1.0 .
#
# Stage 1 builds with Rust and the eBPF toolchain (ebpf/build.rs compiles the C probes with
# clang-19 and keeps their BTF with llvm-strip-19; libbpf-dev gives bpf_helpers.h; bindgen loads
# libclang-19 to generate the Rust types of podscope.h). Stage 2 is
# distroless "cc": glibc and libgcc, which the binary links against, and no shell or package
# manager. linux/amd64 only: the pinned vmlinux.h is x86_64's (ebpf/include/x86_64).

# Debian 12 (bookworm), whose main archive has clang-19. Rust 1.89: the workspace's rust-version
# (Cargo.toml; kube 5 needs it). scripts/test-helm.sh fails when Cargo.toml asks for more.
FROM rust:1.89-bookworm AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       clang-19 llvm-19 libbpf-dev libclang-19-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions the tests ran with (Cargo.lock).
RUN cargo build --release --locked --bin podscope \
    && cp target/release/podscope /podscope

# bpftrace for `kubectl podscope bpftrace` (the session extension runs it only when
# extensions.session.bpftrace.enabled is true): Debian 12's bpftrace and the shared libraries it
# links against, copied with their paths into the final image (which has no package manager).
FROM debian:bookworm-slim AS bpftrace
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bpftrace \
    && mkdir -p /out/usr/bin \
    && cp /usr/bin/bpftrace /out/usr/bin/bpftrace \
    && ldd /usr/bin/bpftrace | awk '$3 ~ /^\// { print $3 }' | xargs -I{} cp --parents -L {} /out/ \
    && rm -rf /var/lib/apt/lists/*

# glibc and libgcc only; the same Debian release the binary was built on, so glibc matches.
FROM gcr.io/distroless/cc-debian12
COPY --from=bpftrace /out/ /
COPY --from=build /podscope /usr/bin/podscope
WORKDIR /
# Prometheus scrape endpoint, OTLP gRPC and HTTP, the agent's own telemetry (in the chart's config).
EXPOSE 9464 4317 4318 8888
# Runs as root (uid 0): loading eBPF needs CAP_BPF / CAP_PERFMON, which the chart grants to root
# alone, dropping every other capability.
USER 0
ENTRYPOINT ["/usr/bin/podscope"]
# The embedded default config; the chart passes `run --config /etc/podscope/config.yaml` (its
# ConfigMap).
CMD ["run"]
