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
 && sh deploy/docker/rootfs.sh target/release/bulkhead-agent bulkhead-agent /out/rootfs

# FROM scratch: the binary, exactly the shared libraries it loads and a passwd/group entry for
# 65532 (deploy/docker/rootfs.sh), the same layout and config as `cargo xtask images` builds.
# The NVIDIA container runtime mounts the host's libnvidia-ml.so.1 into the container (in
# /usr/lib/x86_64-linux-gnu on Debian/Ubuntu hosts, /usr/lib64 on RHEL-family ones); there is
# no ld.so.cache in the image, so LD_LIBRARY_PATH names where the agent's dlopen looks.
FROM scratch
COPY --from=builder /out/rootfs/ /
# Root is required for bpf(); the DaemonSet drops every capability but BPF, NET_ADMIN, PERFMON.
# hadolint ignore=DL3002
USER 0:0
ENV LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/usr/lib64:/usr/local/nvidia/lib64:/usr/local/nvidia/lib
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/bulkhead-agent"]
CMD ["run"]
