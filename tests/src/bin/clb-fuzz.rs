//! `cargo xtask fuzz [--frames N] [--http-inputs N] [--seed S]`: the datapath fuzzer at volume
//! (see `clb_tests::fuzz`), then the HTTP fuzzer (`clb_tests::http_fuzz`, HTTP/1.1 and HTTP/2
//! inputs through the proxy). Prints rates, the frames per verdict and the HTTP outcomes;
//! exits non-zero if any invariant broke (the frames are written to `tests/fuzz-fixtures/`).

use std::process::ExitCode;

use clb_tests::{fuzz, lab::with_lab};

fn main() -> ExitCode {
    let mut frames: u64 = 10_000_000;
    let mut http_inputs: u64 = 1_000_000;
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--frames", Some(n)) => frames = n,
            ("--http-inputs", Some(n)) => http_inputs = n,
            ("--seed", Some(s)) => seed = s,
            _ => {
                eprintln!("usage: clb-fuzz [--frames N] [--http-inputs N] [--seed S]");
                return ExitCode::FAILURE;
            }
        }
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-fixtures");
    println!("fuzzing the datapath with {frames} frames, seed {seed}");
    // Chunks of a million frames, each on a fresh lab (fresh tables), with derived seeds.
    let mut total = fuzz::FuzzReport::default();
    let mut left = frames;
    let mut chunk = 0u64;
    while left > 0 {
        let n = left.min(1_000_000);
        let r = with_lab(|lab| fuzz::run(lab, n, seed.wrapping_add(chunk), Some(&dir)));
        total.frames += r.frames;
        total.seconds += r.seconds;
        for (t, v) in total.verdicts.iter_mut().zip(r.verdicts) {
            *t += v;
        }
        for (t, v) in total.verdicts6.iter_mut().zip(r.verdicts6) {
            *t += v;
        }
        total.failures.extend(r.failures);
        left -= n;
        chunk += 1;
        println!(
            "  {} frames, {:.0} frames/s, {} failures so far",
            total.frames,
            total.frames_per_sec(),
            total.failures.len()
        );
    }
    println!(
        "{} frames in {:.1} s: {:.0} frames/s; verdicts: aborted {} drop {} pass {} tx {} redirect {} (IPv6: drop {} pass {} tx {} redirect {}); invariant violations: {}",
        total.frames,
        total.seconds,
        total.frames_per_sec(),
        total.verdicts[0],
        total.verdicts[1],
        total.verdicts[2],
        total.verdicts[3],
        total.verdicts[4],
        total.verdicts6[1],
        total.verdicts6[2],
        total.verdicts6[3],
        total.verdicts6[4],
        total.failures.len()
    );
    for (why, _) in total.failures.iter().take(10) {
        eprintln!("  {why}");
    }
    let mut ok = total.failures.is_empty();
    if http_inputs > 0 {
        println!("fuzzing the HTTP proxy with {http_inputs} inputs, seed {seed}");
        let r = clb_tests::http_fuzz::run(http_inputs, seed);
        println!(
            "{} HTTP inputs in {:.1} s: {:.0}/s; {} backend requests; panics {}, connections that never ended {}, non-HTTP answers {}",
            r.inputs,
            r.seconds,
            r.inputs as f64 / r.seconds,
            r.backend_requests,
            r.panics,
            r.hung,
            r.garbled
        );
        for e in &r.examples {
            eprintln!("  {}", String::from_utf8_lossy(e).escape_debug());
        }
        ok &= r.panics == 0 && r.hung == 0 && r.garbled == 0;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
