//! `cargo xtask demo`: the real bulkhead-agent with synthetic tagged traffic from three tenants
//! (and some untagged traffic), printing the per-tenant table the agent's /metrics gives.

use bulkhead_tests::harness::{Agent, Metrics, Paths, tcp_pair, transfer};
use std::os::fd::AsFd;
use std::process::ExitCode;

/// (tenant, request bytes, response bytes, connections) per round: an inference-like shape of
/// small requests and larger responses, with one heavy tenant.
const TENANTS: &[(&str, usize, usize, usize)] = &[
    ("acme", 64 << 10, 4 << 20, 3),
    ("globex", 16 << 10, 1 << 20, 2),
    ("initech", 4 << 10, 256 << 10, 1),
];
const UNTAGGED_BYTES: usize = 512 << 10;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve = args.iter().any(|a| a == "--serve");
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let exe = std::env::current_exe().expect("current exe");
    let agent_bin = exe.with_file_name("bulkhead-agent");
    let agent_bin = agent_bin.to_str().unwrap();
    let pre = std::process::Command::new(agent_bin)
        .arg("preflight")
        .output();
    match pre {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "The demo runs the real agent, which loads eBPF programs: run it as root.\n{}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return ExitCode::from(77);
        }
        Err(e) => {
            eprintln!("cannot run {agent_bin}: {e} (build it with `cargo xtask demo`)");
            return ExitCode::from(71);
        }
    }

    let paths = Paths::named("demo");
    let mut config = format!(
        "pin_dir = {:?}\nadmin_addr = \"127.0.0.1:0\"\n[tagging]\nsocket_path = {:?}\nallowed_uids = [{}]\n",
        paths.pin_dir,
        paths.socket,
        nix::unistd::geteuid().as_raw()
    );
    for (name, ..) in TENANTS {
        config.push_str(&format!("[[tenants]]\nname = \"{name}\"\n"));
    }
    let agent = Agent::start(agent_bin, &paths, &config);
    println!(
        "bulkhead-agent is running: metrics at http://{}/metrics, tagging API at {}",
        agent.admin,
        paths.socket.display()
    );
    println!(
        "programs attached to cgroup {}, maps pinned in {}\n",
        agent.ready_line["cgroup"].as_str().unwrap_or("?"),
        paths.pin_dir.display()
    );
    let client = agent.client();
    let mut round = 0;
    loop {
        round += 1;
        for &(tenant, request, response, conns) in TENANTS {
            for _ in 0..conns {
                let (mut c, mut s) = tcp_pair();
                for sock in [c.as_fd(), s.as_fd()] {
                    client.tag(sock, tenant).expect("tag a demo socket");
                }
                transfer(&mut c, &mut s, request);
                transfer(&mut s, &mut c, response);
            }
        }
        let (mut c, mut s) = tcp_pair();
        transfer(&mut c, &mut s, UNTAGGED_BYTES);
        print_table(round, &agent.metrics());
        if round >= rounds && !serve {
            break;
        }
        if serve {
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    }
    println!("\nexpected per round (payload only, both directions): ");
    for &(tenant, request, response, conns) in TENANTS {
        println!(
            "  {tenant:<10} {:>12} bytes each way",
            (request + response) * conns
        );
    }
    println!("  untagged   >= {UNTAGGED_BYTES} bytes (and whatever else this machine sent)");
    agent.stop();
    ExitCode::SUCCESS
}

fn print_table(round: usize, m: &Metrics) {
    println!("round {round}:");
    println!(
        "  {:<10} {:>14} {:>14} {:>12} {:>12}",
        "tenant", "egress bytes", "ingress bytes", "egress pkts", "ingress pkts"
    );
    let mut names: Vec<&str> = TENANTS.iter().map(|t| t.0).collect();
    names.push("untagged");
    for t in names {
        println!(
            "  {:<10} {:>14} {:>14} {:>12} {:>12}",
            t,
            m.bytes(t, "egress"),
            m.bytes(t, "ingress"),
            m.packets(t, "egress"),
            m.packets(t, "ingress")
        );
    }
}
