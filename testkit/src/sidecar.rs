//! The sidecar under test, from outside: requests signed as a gateway signs them, and the
//! built `bulkhead-sidecar` binary run on a config file ([`SidecarProcess`]).

use bulkhead_client::{SignOptions, TENANT_HEADER, sign_request};
use http::{HeaderMap, HeaderValue, Method, Uri};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// The headers a gateway sends for `body`: the tenant header, `content-type:
/// application/json` and an RFC 9421 signature by `key_id` created now (`tweak` adjusts the
/// signing options).
pub fn signed_headers(
    tenant: &str,
    method: &Method,
    path: &str,
    body: &[u8],
    key_id: &str,
    key: &[u8],
    tweak: impl FnOnce(&mut SignOptions),
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(TENANT_HEADER, HeaderValue::from_str(tenant).unwrap());
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let mut o = SignOptions::new(key_id, crate::now());
    tweak(&mut o);
    let path_only: Uri = path.parse().unwrap();
    sign_request(method, &path_only, &mut headers, body, key, &o).unwrap();
    headers
}

/// The `bulkhead-sidecar` binary of this build (`target/<profile>/bulkhead-sidecar`, next to
/// the running test's directory), built once per test process with `cargo build` (a no-op when
/// it is current; a test of another package does not get it built otherwise).
/// `BULKHEAD_SIDECAR_BIN` names another one.
pub fn sidecar_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("BULKHEAD_SIDECAR_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().unwrap();
        let mut dir = exe.parent().unwrap();
        if dir.ends_with("deps") {
            dir = dir.parent().unwrap();
        }
        let profile_dir = dir.to_path_buf();
        let target_dir = profile_dir.parent().unwrap();
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(other) => other,
            None => "dev",
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", "bulkhead-sidecar", "--bin"])
            .arg("bulkhead-sidecar")
            .args(["--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for bulkhead-sidecar");
        assert!(status.success(), "cargo build -p bulkhead-sidecar failed");
        profile_dir.join("bulkhead-sidecar")
    })
    .clone()
}

/// `text` with each `[listen]` address of port 0 (`addr`, `admin_addr`) set to a free port,
/// and the two addresses the sidecar will listen on.
fn with_free_ports(text: &str) -> (String, SocketAddr, SocketAddr) {
    let mut out = String::new();
    let mut in_listen = false;
    let (mut addr, mut admin) = (None, None);
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_listen = t == "[listen]";
        }
        let key = t.split('=').next().unwrap_or("").trim();
        if in_listen && (key == "addr" || key == "admin_addr") {
            let value = t.split('"').nth(1).expect("a quoted address");
            let mut a: SocketAddr = value.parse().expect("a socket address");
            if a.port() == 0 {
                a.set_port(crate::free_port());
            }
            out.push_str(&format!("{key} = \"{a}\""));
            *(if key == "addr" { &mut addr } else { &mut admin }) = Some(a);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    let (Some(addr), Some(admin)) = (addr, admin) else {
        panic!("the config sets no [listen] addr and admin_addr:\n{text}");
    };
    (out, addr, admin)
}

/// How to run the binary: another binary than [`sidecar_bin`], arguments after `run --config
/// <file>`, environment variables.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub bin: Option<PathBuf>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// The built `bulkhead-sidecar` running `run --config <dir>/sidecar.toml`, its output in
/// `<dir>/sidecar.log`; killed when dropped.
pub struct SidecarProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    log_path: PathBuf,
    child: Option<tokio::process::Child>,
}

impl SidecarProcess {
    /// Write `config` to `<dir>/sidecar.toml`, its `[listen]` addresses of port 0 replaced by
    /// free ports, and start the binary on it; returns once `/readyz` answers 200. A free port
    /// taken by someone else before the sidecar bound it is retried on other ports.
    pub async fn start(config: &str, dir: &Path) -> SidecarProcess {
        Self::start_with(config, dir, Launch::default()).await
    }

    /// [`SidecarProcess::start`] as `launch` says.
    pub async fn start_with(config: &str, dir: &Path, launch: Launch) -> SidecarProcess {
        let bin = launch.bin.clone().unwrap_or_else(sidecar_bin);
        for _ in 0..5 {
            let (text, addr, admin) = with_free_ports(config);
            let config_path = dir.join("sidecar.toml");
            std::fs::write(&config_path, &text).unwrap();
            let log_path = dir.join("sidecar.log");
            let log = std::fs::File::create(&log_path).unwrap();
            let child = tokio::process::Command::new(&bin)
                .arg("run")
                .arg("--config")
                .arg(&config_path)
                .args(&launch.args)
                .envs(launch.env.iter().map(|(k, v)| (k, v)))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
            let mut p = SidecarProcess {
                addr,
                admin,
                config_path,
                log_path,
                child: Some(child),
            };
            if p.wait_ready().await {
                return p;
            }
            let log = p.log();
            if text == config || !log.contains("Address already in use") {
                panic!("the sidecar exited before it was ready:\n{log}");
            }
        }
        panic!("could not start the sidecar on free ports");
    }

    /// Poll `/readyz` (10 s at most); `false` when the process exited first.
    async fn wait_ready(&mut self) -> bool {
        let url = format!("http://{}/readyz", self.admin);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if crate::http::get(&url).await.map(|r| r.0) == Some(http::StatusCode::OK) {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                return false;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the sidecar never became ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What the sidecar has written so far (standard output and error).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.admin)
    }

    /// SIGTERM (the sidecar drains), and wait: panics unless it exits with success within
    /// 10 s. Everything it wrote.
    pub async fn stop(mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return self.log();
        };
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the sidecar stops on SIGTERM")
            .unwrap();
        assert!(
            status.success(),
            "the sidecar exited with {status}:\n{}",
            self.log()
        );
        self.log()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listen_sections_port_zero_addresses_get_free_ports() {
        let text = "[upstream]\naddr = \"127.0.0.1:0\"\n[listen]\naddr = \"127.0.0.1:0\"\n\
                    admin_addr = \"127.0.0.1:9464\"\n[auth]\n";
        let (out, addr, admin) = with_free_ports(text);
        assert_ne!(addr.port(), 0);
        assert_eq!(admin, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(
            out,
            format!(
                "[upstream]\naddr = \"127.0.0.1:0\"\n[listen]\naddr = \"{addr}\"\n\
                 admin_addr = \"127.0.0.1:9464\"\n[auth]\n"
            )
        );
    }
}
