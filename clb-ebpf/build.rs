//! Build glue for the eBPF object.
//!
//! Building this crate has an undeclared dependency on the `bpf-linker` binary (cargo has no
//! way to say so): rebuild when it changes. (The round-robin cursor's atomic fetch-and-add
//! needs BPF ISA v3; LLVM >= 20, which bpf-linker here is built against, makes v3 the
//! "generic" CPU that rustc asks for.)
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo::rerun-if-changed={}", linker.display());
    }
}
