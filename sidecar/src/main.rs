//! bulkhead-sidecar: not built yet (see the sidecar issue).
#![forbid(unsafe_code)]

fn main() {
    eprintln!("bulkhead-sidecar: not implemented yet");
    std::process::exit(2);
}
