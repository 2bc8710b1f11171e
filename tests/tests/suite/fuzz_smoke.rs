//! The datapath fuzzer at a reduced count (`cargo xtask fuzz` runs 10^7 frames and more), and
//! a replay of every frame that ever broke an invariant (`tests/fuzz-fixtures/*.hex`).

use clb_tests::{fuzz, lab::with_lab};

fn fixtures_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-fixtures")
}

#[test]
fn a_hundred_thousand_fuzzed_frames_keep_every_invariant() {
    let seed = std::env::var("CLB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00c1_b0f5);
    let r = with_lab(|lab| fuzz::run(lab, 100_000, seed, Some(&fixtures_dir())));
    println!(
        "{} frames in {:.1} s ({:.0}/s): aborted {} drop {} pass {} tx {} redirect {}",
        r.frames,
        r.seconds,
        r.frames_per_sec(),
        r.verdicts[0],
        r.verdicts[1],
        r.verdicts[2],
        r.verdicts[3],
        r.verdicts[4]
    );
    assert!(
        r.failures.is_empty(),
        "{} invariant violations (seed {seed}), first: {}",
        r.failures.len(),
        r.failures[0].0
    );
    println!(
        "IPv6: drop {} pass {} tx {} redirect {}",
        r.verdicts6[1], r.verdicts6[2], r.verdicts6[3], r.verdicts6[4]
    );
    // Every verdict is exercised, in both families.
    for (v, name) in [(1, "drop"), (2, "pass"), (3, "tx"), (4, "redirect")] {
        assert!(
            r.verdicts[v] > 100,
            "only {} {name} verdicts",
            r.verdicts[v]
        );
        assert!(
            r.verdicts6[v] > 50,
            "only {} IPv6 {name} verdicts",
            r.verdicts6[v]
        );
    }
}

#[test]
fn frames_that_once_broke_an_invariant_keep_every_invariant() {
    let mut frames = Vec::new();
    for e in std::fs::read_dir(fixtures_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "hex") {
            let hex = std::fs::read_to_string(&p).unwrap();
            let bytes: Vec<u8> = (0..hex.trim().len() / 2)
                .map(|i| u8::from_str_radix(&hex.trim()[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            frames.push((p, bytes));
        }
    }
    with_lab(|lab| {
        for (p, f) in &frames {
            if let Err(why) = fuzz::replay(lab, f) {
                panic!("{}: {why}", p.display());
            }
        }
    });
    println!("{} saved frames replayed", frames.len());
}

/// The HTTP fuzzer at a reduced count (`cargo xtask fuzz` runs 10^6 inputs).
#[test]
fn twenty_thousand_fuzzed_http_inputs_panic_nothing_and_every_connection_ends() {
    let seed = std::env::var("CLB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0068_7474);
    let r = clb_tests::http_fuzz::run(20_000, seed);
    println!(
        "{} HTTP inputs in {:.1} s ({:.0}/s): {} backend requests, {} panics, {} hung, {} garbled",
        r.inputs,
        r.seconds,
        r.inputs as f64 / r.seconds,
        r.backend_requests,
        r.panics,
        r.hung,
        r.garbled
    );
    let shown: Vec<String> = r
        .examples
        .iter()
        .map(|e| String::from_utf8_lossy(e).escape_debug().to_string())
        .collect();
    assert_eq!(r.panics, 0, "panics (seed {seed}): {shown:?}");
    assert_eq!(
        r.hung, 0,
        "connections that never ended (seed {seed}): {shown:?}"
    );
    assert_eq!(r.garbled, 0, "non-HTTP answers (seed {seed}): {shown:?}");
    assert!(
        r.backend_requests > 1000,
        "too few inputs reached the backend: {r:?}"
    );
    let h2_seeds = r
        .seeds_proxied
        .iter()
        .filter(|s| s.starts_with("PRI * HTTP/2.0"))
        .count();
    assert!(
        r.seeds_proxied.len() >= 10 && h2_seeds >= 2,
        "seeds that reach the backend: {:?}",
        r.seeds_proxied
    );
}
