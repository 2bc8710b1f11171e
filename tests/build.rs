//! Builds the test traffic generator and sink (`tests/gen`, XDP) for `bpfel-unknown-none` and
//! leaves the object in `OUT_DIR/clb-gen`, embedded by `src/gen.rs`.
use std::path::PathBuf;

use anyhow::anyhow;

include!("../clb-ebpf/build_object.rs");

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("tests has no parent directory"))?;
    build_ebpf_object(
        root,
        "clb-gen",
        &manifest_dir.join("gen"),
        &["clb-gen"],
        &[],
    )
}
