//! `cargo xtask gpu-check`: on a machine with an NVIDIA GPU and driver, checks the agent's GPU
//! memory attribution against NVML's own per-process figures.
//!
//! Builds the agent; starts two processes, each in a cgroup of its own named like a Kubernetes
//! pod (`pod<uid>`), each allocating a known amount of GPU memory through the CUDA driver API
//! (`libcuda.so.1`, loaded at run time: no CUDA toolkit is needed to build); runs the agent with
//! `gpu.source = "nvml"` and the two pods configured as dedicated to tenants `gpu-check-a` and
//! `gpu-check-b`; and checks that `bulkhead_gpu_memory_bytes{tenant}` matches the memory
//! `nvidia-smi` (NVML) reports for each process, within 5 %. Then the compute case: two
//! processes in the same two pod-like cgroups run a spinning kernel (PTX loaded through the
//! driver API) for 60 % and 20 % of every 100 ms on GPU 0, time-sliced; over a 20 s window the
//! agent's `bulkhead_gpu_busy_seconds_total` of the two tenants must be in the ratio 3 within
//! 10 %, and the GPU's `bulkhead_gpu_energy_joules_total` series must add up to its energy
//! counter's delta (`bulkhead_gpu_device_energy_joules_total`). Needs root (the agent loads its
//! eBPF programs). Without an NVIDIA GPU it fails at once, saying so.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN: &str = "127.0.0.1:19465";
const POD_A: &str = "6a7b8c9d-0000-4000-8000-00000000000a";
const POD_B: &str = "6a7b8c9d-0000-4000-8000-00000000000b";
const MIB: u64 = 1 << 20;

pub fn run(bin_dir: Option<&Path>) -> Result<()> {
    if !Path::new("/dev/nvidiactl").exists() {
        bail!(
            "gpu-check needs an NVIDIA GPU and driver: /dev/nvidiactl is missing on this machine, \
             so nothing was checked"
        );
    }
    let smi = Command::new("nvidia-smi").arg("-L").output();
    match smi {
        Ok(o) if o.status.success() => eprintln!("{}", String::from_utf8_lossy(&o.stdout).trim()),
        _ => bail!("gpu-check: nvidia-smi -L failed; is the NVIDIA driver loaded?"),
    }
    // With --bin-dir, a machine without the toolchain runs binaries built elsewhere.
    let agent_bin = match bin_dir {
        Some(dir) => dir.join("bulkhead-agent"),
        None => {
            crate::setup::run()?;
            crate::run(crate::cargo().args([
                "build",
                "--release",
                "-p",
                "bulkhead-agent",
                "--bin",
                "bulkhead-agent",
            ]))?;
            crate::target_dir().join("release/bulkhead-agent")
        }
    };
    let work = std::env::temp_dir().join(format!("bulkhead-gpu-check-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;

    let cgroup_root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
        .context("no cgroup-v2 mount")?;
    let base = cgroup_root.join(format!("bulkhead-gpu-check-{}", std::process::id()));
    let pods = [
        (POD_A, "gpu-check-a", 1024 * MIB),
        (POD_B, "gpu-check-b", 2048 * MIB),
    ];
    let mut allocators = Vec::new();
    for (uid, _, bytes) in pods {
        let cg = base.join(format!("pod{uid}"));
        std::fs::create_dir_all(&cg)
            .with_context(|| format!("create the pod-like cgroup {}", cg.display()))?;
        allocators.push(Allocator::start(&cg, bytes)?);
    }
    let config = format!(
        "pin_dir = \"/sys/fs/bpf/bulkhead-gpu-check\"\nadmin_addr = \"{ADMIN}\"\n\
         [gpu]\nsource = \"nvml\"\npoll_interval_ms = 1000\n\
         [[gpu.workloads]]\npod_uid = \"{POD_A}\"\ntenant = \"gpu-check-a\"\n\
         [[gpu.workloads]]\npod_uid = \"{POD_B}\"\ntenant = \"gpu-check-b\"\n\
         [tagging]\nsocket_path = {:?}\n\
         [[tenants]]\nname = \"gpu-check-a\"\n[[tenants]]\nname = \"gpu-check-b\"\n",
        work.join("agent.sock")
    );
    let cfg = work.join("agent.toml");
    std::fs::write(&cfg, config)?;

    // 1. One poll through NVML, attributed as the agent does, without eBPF.
    let status = check_gpu_status(&agent_bin, &cfg, &allocators, &pods);
    // 2. The running agent's metrics (needs root and BPF).
    let result = status.and_then(|()| {
        let mut agent = KillOnDrop(
            Command::new(&agent_bin)
                .arg("--config")
                .arg(&cfg)
                .stderr(Stdio::inherit())
                .spawn()
                .context("start the agent")?,
        );
        let r = check(&allocators, &pods);
        let _ = agent.0.kill();
        let _ = agent.0.wait();
        r
    });
    drop(allocators);
    // 3. GPU time: two busy processes in the same pods, a fresh agent.
    let result = result.and_then(|()| {
        let busy = [(POD_A, "gpu-check-a", 0.6), (POD_B, "gpu-check-b", 0.2)];
        let mut spinners = Vec::new();
        for (uid, _, fraction) in busy {
            spinners.push(start_spinner(&base.join(format!("pod{uid}")), fraction)?);
        }
        let mut agent = KillOnDrop(
            Command::new(&agent_bin)
                .arg("--config")
                .arg(&cfg)
                .stderr(Stdio::inherit())
                .spawn()
                .context("start the agent")?,
        );
        let r = check_compute(&busy);
        let _ = agent.0.kill();
        let _ = agent.0.wait();
        drop(spinners);
        r
    });
    for (uid, _, _) in pods {
        let _ = std::fs::remove_dir(base.join(format!("pod{uid}")));
    }
    let _ = std::fs::remove_dir(&base);
    let _ = std::fs::remove_dir_all("/sys/fs/bpf/bulkhead-gpu-check");
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// `bulkhead-agent gpu-status --json` against nvidia-smi: each allocator's process is found in
/// its pod's cgroup, classified as its tenant, and its tenant's memory matches NVML's figure.
fn check_gpu_status(
    agent_bin: &Path,
    cfg: &Path,
    allocators: &[Allocator],
    pods: &[(&str, &str, u64); 2],
) -> Result<()> {
    let out = Command::new(agent_bin)
        .arg("--config")
        .arg(cfg)
        .args(["gpu-status", "--json"])
        .output()
        .context("run bulkhead-agent gpu-status")?;
    if !out.status.success() {
        bail!(
            "bulkhead-agent gpu-status failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    println!("gpu-status: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).context("gpu-status JSON")?;
    let nvml = nvml_by_pid()?;
    println!(
        "| tenant | allocated | NVML (nvidia-smi) | gpu-status | ratio | workload of the pid |"
    );
    println!("|---|---|---|---|---|---|");
    let mut ok = true;
    for (a, (_, tenant, bytes)) in allocators.iter().zip(pods) {
        let want = *nvml
            .get(&a.pid())
            .with_context(|| format!("nvidia-smi lists no process {}", a.pid()))?;
        let got: u64 = v["gpus"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g["memory"][*tenant].as_u64())
            .sum();
        let workload = v["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["pid"] == a.pid())
            .and_then(|p| p["workload"].as_str())
            .unwrap_or("not listed")
            .to_string();
        let ratio = got as f64 / want as f64;
        println!(
            "| {tenant} | {} MiB | {} MiB | {} MiB | {ratio:.3} | {workload} |",
            bytes / MIB,
            want / MIB,
            got / MIB
        );
        ok &= (0.95..=1.05).contains(&ratio) && workload == format!("tenant {tenant}");
    }
    if !ok {
        bail!("gpu-status: the attribution is off NVML's per-process figures");
    }
    println!("gpu-check: gpu-status ok");
    Ok(())
}

fn check(allocators: &[Allocator], pods: &[(&str, &str, u64); 2]) -> Result<()> {
    let nvml = nvml_by_pid()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        if let Ok(text) = http_get_metrics()
            && pods.iter().all(|(_, t, _)| gpu_bytes(&text, t) > 0)
        {
            break text;
        }
        if Instant::now() > deadline {
            bail!("the agent exported no GPU memory for the two tenants within 60 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("| tenant | allocated | NVML (nvidia-smi) | agent | agent / NVML |");
    println!("|---|---|---|---|---|");
    let mut ok = true;
    for (a, (_, tenant, bytes)) in allocators.iter().zip(pods) {
        let want = *nvml
            .get(&a.pid())
            .with_context(|| format!("nvidia-smi lists no process {}", a.pid()))?;
        let got = gpu_bytes(&metrics, tenant);
        let ratio = got as f64 / want as f64;
        println!(
            "| {tenant} | {} MiB | {} MiB | {} MiB | {ratio:.3} |",
            bytes / MIB,
            want / MIB,
            got / MIB
        );
        ok &= (0.95..=1.05).contains(&ratio);
    }
    if !ok {
        bail!("the agent's figures are more than 5 % off NVML's");
    }
    println!("gpu-check: ok");
    Ok(())
}

/// Sum of `name` over the series with `tenant` (any when `None`) and `gpu="0"`.
fn series_sum(metrics: &str, name: &str, tenant: Option<&str>) -> f64 {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter(|l| {
            l.starts_with(&prefix)
                && l.contains("gpu=\"0\"")
                && tenant.is_none_or(|t| l.contains(&format!("tenant=\"{t}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The compute case: the two tenants' GPU busy seconds over a window against the fractions
/// their processes keep the GPU busy, and the GPU's energy series against its counter.
fn check_compute(busy: &[(&str, &str, f64); 2]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    // The agent's first polls are its baseline: start once both tenants have busy time.
    let start = loop {
        if let Ok(text) = http_get_metrics()
            && busy.iter().all(|(_, t, _)| {
                series_sum(&text, "bulkhead_gpu_busy_seconds_total", Some(t)) > 0.0
            })
        {
            break text;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent attributed no GPU busy time to the two tenants within 60 s (is GPU 0 \
                 in MIG mode? does its driver give per-process utilization samples?)"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    // A measurement window, not a wait for a condition.
    let window = Duration::from_secs(20);
    std::thread::sleep(window);
    let end = http_get_metrics().context("scrape the agent")?;
    let delta = |name: &str, tenant: Option<&str>| {
        series_sum(&end, name, tenant) - series_sum(&start, name, tenant)
    };
    let secs = window.as_secs_f64();
    println!("| tenant | busy fraction run | GPU-seconds attributed | fraction attributed |");
    println!("|---|---|---|---|");
    let mut got = Vec::new();
    for (_, tenant, fraction) in busy {
        let b = delta("bulkhead_gpu_busy_seconds_total", Some(tenant));
        println!(
            "| {tenant} | {fraction:.2} | {b:.3} s over ~{secs:.0} s | {:.3} |",
            b / secs
        );
        got.push(b);
    }
    let device = delta("bulkhead_gpu_device_busy_seconds_total", None);
    let unattributed = delta("bulkhead_gpu_busy_seconds_total", Some("unattributed"));
    println!("GPU 0 busy {device:.3} s, unattributed {unattributed:.3} s");
    let want = busy[0].2 / busy[1].2;
    let ratio = got[0] / got[1];
    println!("ratio of GPU-seconds a/b: {ratio:.3} (fractions: {want:.3})");
    let energy_device = delta("bulkhead_gpu_device_energy_joules_total", None);
    let energy_series = delta("bulkhead_gpu_energy_joules_total", None);
    println!(
        "energy: device counter delta {energy_device:.1} J, series sum {energy_series:.1} J ({:.0} W)",
        energy_device / secs
    );
    let mut ok = true;
    if !(want * 0.9..=want * 1.1).contains(&ratio) {
        eprintln!("gpu-check: the GPU-seconds ratio {ratio:.3} is more than 10 % off {want:.3}");
        ok = false;
    }
    if energy_device <= 0.0 || (energy_series - energy_device).abs() > 1e-6 * energy_device.max(1.0)
    {
        eprintln!(
            "gpu-check: the energy series ({energy_series} J) do not add up to the device's delta ({energy_device} J)"
        );
        ok = false;
    }
    if !ok {
        bail!("the compute case failed");
    }
    println!("gpu-check: compute ok");
    Ok(())
}

/// NVML's per-process used memory (summed over GPUs), in bytes, from nvidia-smi.
fn nvml_by_pid() -> Result<BTreeMap<u32, u64>> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .context("run nvidia-smi")?;
    let mut by_pid = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split(',').map(str::trim);
        if let (Some(Ok(pid)), Some(Ok(mib))) = (
            f.next().map(str::parse::<u32>),
            f.next().map(str::parse::<u64>),
        ) {
            *by_pid.entry(pid).or_default() += mib * MIB;
        }
    }
    Ok(by_pid)
}

fn gpu_bytes(metrics: &str, tenant: &str) -> u64 {
    let prefix = "bulkhead_gpu_memory_bytes{";
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix) && l.contains(&format!("tenant=\"{tenant}\"")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn http_get_metrics() -> std::io::Result<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(ADMIN)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// A child process ended on drop: its stdin closed first (a helper's cue to exit), then killed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// This binary run as `args` in `cgroup`, once it printed READY; stdin held open (closing it
/// tells the helper to exit) and the process killed on drop. `what` names it in the error.
fn start_in_cgroup(cgroup: &Path, args: &[&str], what: &str) -> Result<KillOnDrop> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
        .arg("sh")
        .arg(cgroup)
        .arg(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    if !line.starts_with("READY") {
        let _ = child.kill();
        bail!("the {what} in {} failed: {line}", cgroup.display());
    }
    Ok(KillOnDrop(child))
}

/// A process in a cgroup holding `bytes` of GPU memory until dropped.
struct Allocator(KillOnDrop);

impl Allocator {
    fn start(cgroup: &Path, bytes: u64) -> Result<Self> {
        start_in_cgroup(cgroup, &["gpu-alloc", &bytes.to_string()], "GPU allocator").map(Self)
    }

    fn pid(&self) -> u32 {
        self.0.0.id()
    }
}

/// A process in a cgroup keeping GPU 0 busy for `fraction` of every 100 ms until dropped.
fn start_spinner(cgroup: &Path, fraction: f64) -> Result<KillOnDrop> {
    start_in_cgroup(cgroup, &["gpu-busy", &fraction.to_string()], "GPU spinner")
}

/// A kernel that spins until `ns` nanoseconds of the GPU's global timer have passed (one
/// thread: the GPU counts as busy while any kernel runs, which is what NVML samples).
const SPIN_PTX: &std::ffi::CStr = c".version 7.0
.target sm_70
.address_size 64
.visible .entry spin(.param .u64 ns)
{
    .reg .pred p;
    .reg .u64 t0, t1, d, lim;
    ld.param.u64 lim, [ns];
    mov.u64 t0, %globaltimer;
LOOP:
    mov.u64 t1, %globaltimer;
    sub.u64 d, t1, t0;
    setp.lt.u64 p, d, lim;
    @p bra LOOP;
    ret;
}
";

/// `xtask gpu-busy FRACTION`: keeps GPU 0 busy for FRACTION of every 100 ms (a spinning
/// kernel, then idle), says READY once the kernel is loaded, and stops when stdin closes.
pub fn busy(fraction: &str) -> Result<()> {
    let fraction: f64 = fraction.parse().context("gpu-busy FRACTION")?;
    if !(0.0..=1.0).contains(&fraction) {
        bail!("gpu-busy FRACTION: {fraction} is not within 0..=1");
    }
    let cuda = Cuda::load()?;
    let spin = cuda.spin_kernel()?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::stdin().read_line(&mut rest);
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    println!("READY");
    std::io::stdout().flush()?;
    let period = Duration::from_millis(100);
    let on = period.mul_f64(fraction);
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let t = Instant::now();
        cuda.run(spin, on.as_nanos() as u64)?;
        // The duty cycle: idle for the rest of the period.
        if let Some(rest) = period.checked_sub(t.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(())
}

/// `xtask gpu-alloc BYTES`: allocates BYTES of GPU memory on GPU 0 with the CUDA driver API,
/// says READY, and holds it until stdin closes.
pub fn alloc(bytes: &str) -> Result<()> {
    let bytes: u64 = bytes.parse().context("gpu-alloc BYTES")?;
    let cuda = Cuda::load()?;
    cuda.alloc(bytes)?;
    println!("READY");
    std::io::stdout().flush()?;
    let mut rest = String::new();
    let _ = std::io::stdin().read_line(&mut rest);
    Ok(())
}

type CuResult = i32;
type Ptr = *mut std::ffi::c_void;

/// `cuLaunchKernel(f, gridDim x3, blockDim x3, sharedMemBytes, hStream, kernelParams, extra)`.
type LaunchKernel = unsafe extern "C" fn(
    Ptr,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    Ptr,
    *mut Ptr,
    *mut Ptr,
) -> CuResult;

/// The few CUDA driver entry points the allocator and the spinner need, from `libcuda.so.1`.
struct Cuda {
    init: unsafe extern "C" fn(u32) -> CuResult,
    device_get: unsafe extern "C" fn(*mut i32, i32) -> CuResult,
    ctx_create: unsafe extern "C" fn(*mut Ptr, u32, i32) -> CuResult,
    mem_alloc: unsafe extern "C" fn(*mut u64, usize) -> CuResult,
    module_load_data: unsafe extern "C" fn(*mut Ptr, *const std::ffi::c_void) -> CuResult,
    module_get_function: unsafe extern "C" fn(*mut Ptr, Ptr, *const std::ffi::c_char) -> CuResult,
    launch_kernel: LaunchKernel,
    ctx_synchronize: unsafe extern "C" fn() -> CuResult,
}

fn cu_check(what: &str, r: CuResult) -> Result<()> {
    if r == 0 {
        Ok(())
    } else {
        bail!("{what} failed: CUresult {r}")
    }
}

impl Cuda {
    fn load() -> Result<Self> {
        // SAFETY: dlopen with a NUL-terminated name; the handle is kept for the process's life.
        let lib = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW) };
        if lib.is_null() {
            bail!("libcuda.so.1 could not be loaded: no NVIDIA driver here");
        }
        let sym = |name: &std::ffi::CStr| -> Result<*mut std::ffi::c_void> {
            // SAFETY: `lib` is a live handle and `name` NUL-terminated.
            let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
            if p.is_null() {
                bail!("libcuda.so.1 has no {name:?}");
            }
            Ok(p)
        };
        // SAFETY: the symbols are the CUDA driver API functions of these signatures
        // (cuda.h: CUresult is an int, CUdevice an int, CUdeviceptr a 64-bit integer).
        unsafe {
            Ok(Self {
                init: std::mem::transmute::<
                    *mut std::ffi::c_void,
                    unsafe extern "C" fn(u32) -> CuResult,
                >(sym(c"cuInit")?),
                device_get: std::mem::transmute::<
                    *mut std::ffi::c_void,
                    unsafe extern "C" fn(*mut i32, i32) -> CuResult,
                >(sym(c"cuDeviceGet")?),
                ctx_create: std::mem::transmute::<
                    *mut std::ffi::c_void,
                    unsafe extern "C" fn(*mut *mut std::ffi::c_void, u32, i32) -> CuResult,
                >(sym(c"cuCtxCreate_v2")?),
                mem_alloc: std::mem::transmute::<
                    *mut std::ffi::c_void,
                    unsafe extern "C" fn(*mut u64, usize) -> CuResult,
                >(sym(c"cuMemAlloc_v2")?),
                // cuda.h: CUmodule and CUfunction are opaque pointers.
                module_load_data: std::mem::transmute::<
                    *mut std::ffi::c_void,
                    unsafe extern "C" fn(*mut Ptr, *const std::ffi::c_void) -> CuResult,
                >(sym(c"cuModuleLoadData")?),
                module_get_function: std::mem::transmute::<
                    *mut std::ffi::c_void,
                    unsafe extern "C" fn(*mut Ptr, Ptr, *const std::ffi::c_char) -> CuResult,
                >(sym(c"cuModuleGetFunction")?),
                launch_kernel: std::mem::transmute::<*mut std::ffi::c_void, LaunchKernel>(sym(
                    c"cuLaunchKernel",
                )?),
                ctx_synchronize: std::mem::transmute::<
                    *mut std::ffi::c_void,
                    unsafe extern "C" fn() -> CuResult,
                >(sym(c"cuCtxSynchronize")?),
            })
        }
    }

    /// A context on GPU 0 (current on this thread), as the allocator makes it.
    fn context(&self) -> Result<()> {
        let mut dev = 0i32;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: each call gets valid pointers to locals of the types the driver writes.
        unsafe {
            cu_check("cuInit", (self.init)(0))?;
            cu_check("cuDeviceGet", (self.device_get)(&mut dev, 0))?;
            cu_check("cuCtxCreate", (self.ctx_create)(&mut ctx, 0, dev))?;
        }
        Ok(())
    }

    /// A context on GPU 0 and the spinning kernel loaded in it (the driver JIT-compiles the
    /// PTX for the GPU).
    fn spin_kernel(&self) -> Result<Ptr> {
        self.context()?;
        let mut module = std::ptr::null_mut();
        let mut func = std::ptr::null_mut();
        // SAFETY: the image is a NUL-terminated PTX text that lives for the program's life;
        // the out-pointers are locals of the driver's opaque handle type; the context made
        // above is current on this thread.
        unsafe {
            cu_check(
                "cuModuleLoadData",
                (self.module_load_data)(&mut module, SPIN_PTX.as_ptr().cast()),
            )?;
            cu_check(
                "cuModuleGetFunction",
                (self.module_get_function)(&mut func, module, c"spin".as_ptr()),
            )?;
        }
        Ok(func)
    }

    /// Runs the spinning kernel for `ns` nanoseconds (one thread) and waits for it.
    fn run(&self, func: Ptr, ns: u64) -> Result<()> {
        let mut ns = ns;
        let mut params: [Ptr; 1] = [(&raw mut ns).cast()];
        // SAFETY: `func` is the loaded `spin(.param .u64 ns)` kernel; `params` holds one
        // pointer to a u64 that outlives the call (cuLaunchKernel copies the arguments before
        // it returns); the default stream (null) of the current context; no extra options.
        unsafe {
            cu_check(
                "cuLaunchKernel",
                (self.launch_kernel)(
                    func,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    0,
                    std::ptr::null_mut(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
            )?;
            cu_check("cuCtxSynchronize", (self.ctx_synchronize)())?;
        }
        Ok(())
    }

    fn alloc(&self, bytes: u64) -> Result<()> {
        let check = |what: &str, r: CuResult| {
            if r == 0 {
                Ok(())
            } else {
                bail!("{what} failed: CUresult {r}")
            }
        };
        let mut dev = 0i32;
        let mut ctx = std::ptr::null_mut();
        let mut ptr = 0u64;
        // SAFETY: each call gets valid pointers to locals of the types the driver writes.
        unsafe {
            check("cuInit", (self.init)(0))?;
            check("cuDeviceGet", (self.device_get)(&mut dev, 0))?;
            check("cuCtxCreate", (self.ctx_create)(&mut ctx, 0, dev))?;
            check("cuMemAlloc", (self.mem_alloc)(&mut ptr, bytes as usize))?;
        }
        Ok(())
    }
}
