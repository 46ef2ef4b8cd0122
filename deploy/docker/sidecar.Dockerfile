# syntax=docker/dockerfile:1
# bulkhead-sidecar image. Build from the repository root (BuildKit):
#   docker build -f deploy/docker/sidecar.Dockerfile -t bulkhead-sidecar:0.1.0 .
# The sidecar needs only the stable toolchain (no eBPF).

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p bulkhead-sidecar --bin bulkhead-sidecar \
 && install -D -m 0755 target/release/bulkhead-sidecar /out/bulkhead-sidecar

# distroless cc (glibc, libgcc; no shell) as uid/gid 65532, the uid the agent's
# tagging.allowed_uids lets tag sockets. Same Debian release as the builder.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/bulkhead-sidecar /usr/local/bin/bulkhead-sidecar
USER 65532:65532
EXPOSE 8080 9465
ENTRYPOINT ["/usr/local/bin/bulkhead-sidecar"]
CMD ["run", "--config", "/etc/bulkhead/sidecar.toml"]
