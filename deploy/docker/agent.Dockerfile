# syntax=docker/dockerfile:1
# bulkhead-agent image. Build from the repository root (BuildKit):
#   docker build -f deploy/docker/agent.Dockerfile -t bulkhead-agent:0.1.0 .
#
# The agent embeds its eBPF programs, which build with the nightly toolchain (rust-src) and a
# bpf-linker built against the nightly's own LLVM: `cargo xtask setup` installs both, then
# agent/build.rs compiles agent-ebpf/ during `cargo build`.

FROM rust:1-bookworm AS builder
# Libraries bpf-linker links against next to the nightly's libLLVM. Builder stage only, so
# the versions are whatever bookworm ships (not pinned).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends zlib1g-dev libzstd-dev libxml2-dev \
 && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install nightly --profile minimal --component rust-src
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/root/.cache/bulkhead \
    --mount=type=cache,target=/src/target \
    cargo xtask setup \
 && cargo build --release --locked -p bulkhead-agent \
 && install -D -m 0755 target/release/bulkhead-agent /out/bulkhead-agent

# debian-slim rather than distroless: the NVIDIA container runtime injects libnvidia-ml.so and
# runs ldconfig in the image, which needs a regular glibc layout. Same Debian release as the
# builder, so the glibc the binary was linked against is there.
FROM debian:bookworm-slim
COPY --from=builder /out/bulkhead-agent /usr/local/bin/bulkhead-agent
# Root is required for bpf(); the DaemonSet drops every capability but BPF, NET_ADMIN, PERFMON.
# hadolint ignore=DL3002
USER 0:0
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/bulkhead-agent"]
CMD ["run"]
