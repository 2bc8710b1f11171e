fn main() -> anyhow::Result<()> {
    let mut ebpf = aya::Ebpf::load(clb::EBPF_OBJECT)?;
    for name in ["clb_xdp", "clb_pass"] {
        let p: &mut aya::programs::Xdp = ebpf.program_mut(name).unwrap().try_into()?;
        if let Err(e) = p.load() {
            eprintln!("{e:#?}");
            return Err(e.into());
        }
        println!("loaded {name}");
    }
    Ok(())
}
