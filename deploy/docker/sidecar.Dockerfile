# syntax=docker/dockerfile:1
# bulkhead-sidecar image. Build from the repository root (BuildKit):
#   docker build -f deploy/docker/sidecar.Dockerfile -t bulkhead-sidecar:0.1.0 .
# The sidecar needs only the stable toolchain (no eBPF). The image also carries bulkhead-probe
# (/usr/local/bin/bulkhead-probe), the isolation probe deploy/probe/cronjob.yaml runs.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p bulkhead-sidecar --bin bulkhead-sidecar \
      -p bulkhead-probe --bin bulkhead-probe \
 && sh deploy/docker/rootfs.sh target/release/bulkhead-sidecar bulkhead-sidecar /out/rootfs \
      target/release/bulkhead-probe bulkhead-probe

# FROM scratch: the binary, exactly the shared libraries it loads (glibc, libgcc_s) and a
# passwd/group entry for uid/gid 65532, the uid the agent's tagging.allowed_uids lets tag
# sockets (deploy/docker/rootfs.sh): the same layout and config as `cargo xtask images` builds.
FROM scratch
COPY --from=builder /out/rootfs/ /
USER 65532:65532
EXPOSE 8080 9465
ENTRYPOINT ["/usr/local/bin/bulkhead-sidecar"]
CMD ["run", "--config", "/etc/bulkhead/sidecar.toml"]
