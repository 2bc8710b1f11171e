//! Test certificates made with `openssl`: a CA and P-256 certificates it issues for one DNS
//! name each, written as `stem.pem` / `stem.key` in a directory (replaced by rename, as an
//! ACME client does, so re-issuing is a certificate rotation).

use std::path::Path;

use crate::netns::sh;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A CA (`ca.pem`, `ca.key`) in `dir`.
pub fn make_ca(dir: &Path) -> anyhow::Result<()> {
    sh(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        s(&dir.join("ca.key")),
        "-out",
        s(&dir.join("ca.pem")),
        "-subj",
        "/CN=clb test CA",
        "-days",
        "2",
    ])?;
    Ok(())
}

/// Issues a certificate for DNS name `name`, signed by the CA of `dir`, into `stem.pem` and
/// `stem.key` there.
pub fn issue(dir: &Path, stem: &str, name: &str) -> anyhow::Result<()> {
    let f = |suffix: &str| dir.join(format!("{stem}.{suffix}"));
    std::fs::write(f("ext"), format!("subjectAltName=DNS:{name}\n"))?;
    sh(&[
        "openssl",
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        s(&f("key.new")),
        "-out",
        s(&f("csr")),
        "-subj",
        &format!("/CN={name}"),
    ])?;
    sh(&[
        "openssl",
        "x509",
        "-req",
        "-in",
        s(&f("csr")),
        "-CA",
        s(&dir.join("ca.pem")),
        "-CAkey",
        s(&dir.join("ca.key")),
        "-CAcreateserial",
        "-out",
        s(&f("pem.new")),
        "-days",
        "1",
        "-extfile",
        s(&f("ext")),
    ])?;
    for suffix in ["pem", "key"] {
        std::fs::rename(f(&format!("{suffix}.new")), f(suffix))?;
    }
    Ok(())
}
