//! `cargo xtask bench [--quick]`: clb against nftables DNAT, HAProxy and nginx stream, one run,
//! ratios side by side. Prints a table and writes `bench.json` / `bench.md` to `--out`.

use std::{path::PathBuf, time::Instant};

use clb_tests::bench::{
    Scale, balance, conns, dsr, flood, https, l7, memory, perpacket, rate, report::Report,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    // Katran, the same-run peer of the per-packet figures (full runs only).
    let katran_src: Option<PathBuf> = args
        .iter()
        .position(|a| a == "--katran-src")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(clb_tests::bench::katran::default_src);
    let want = |s: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == s));
    let scale = if quick { Scale::QUICK } else { Scale::FULL };
    for bin in ["nft", "haproxy", "nginx", "h2load"] {
        anyhow::ensure!(
            which(bin),
            "{bin} is not installed: the benchmark compares against it (run `cargo xtask setup --bench`)"
        );
    }
    let t0 = Instant::now();
    let mut report = Report {
        date: String::from_utf8_lossy(
            &std::process::Command::new("date")
                .arg("-u")
                .arg("+%Y-%m-%d %H:%M UTC")
                .output()?
                .stdout,
        )
        .trim()
        .to_owned(),
        machine: machine(),
        mode: if quick { "quick" } else { "full" }.into(),
        ..Default::default()
    };
    println!("clb bench ({} run) on {}", report.mode, report.machine);
    if want("perpacket") {
        println!("\n== per-packet cost (BPF_PROG_TEST_RUN) ==");
        perpacket::run(&scale, &mut report)?;
        if quick {
            println!("  Katran: not run in a quick run");
        } else {
            perpacket::katran_rows(&scale, katran_src.as_deref(), &mut report);
        }
    }
    if want("rate") {
        println!("\n== packet rate end to end (live-frames generator, veth topology) ==");
        rate::run(&scale, &mut report)?;
    }
    if want("conns") {
        println!("\n== connections/s and requests/s (real TCP clients) ==");
        conns::run(&scale, &mut report)?;
    }
    if want("balance") {
        println!("\n== held-connection balance (least connections, skewed workload) ==");
        balance::run(&scale, &mut report)?;
    }
    if want("dsr") {
        println!("\n== direct server return vs NAT (64 KiB answers) ==");
        dsr::run(&scale, &mut report)?;
    }
    if want("flood") {
        println!("\n== SYN flood (namespaces, real sockets) ==");
        flood::run(&scale, &mut report)?;
    }
    if want("l7") {
        println!("\n== HTTP listeners (cookie persistence) ==");
        l7::run(&scale, &mut report)?;
    }
    if want("https") {
        println!("\n== HTTPS listeners (TLS, h1 and h2) ==");
        https::run(&scale, &mut report)?;
    }
    if want("memory") {
        println!("\n== map memory and sweeping ==");
        memory::run(&scale, &mut report)?;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    println!("\n{}", report.table());
    report.write(&out)?;
    println!(
        "written to {}/bench.json and bench.md ({:.0} s)",
        out.display(),
        report.seconds
    );
    Ok(())
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(bin).is_file())
    })
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} vCPU {model}, Linux {}", kernel.trim())
}
