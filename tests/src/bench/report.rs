//! The benchmark report: rows of (figure, clb, peers, ratio, target), printed as a table and
//! written as JSON.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

/// One figure of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub section: String,
    pub figure: String,
    pub unit: String,
    /// clb's value.
    pub clb: f64,
    /// Peers' values, by name ("XDP_PASS", "nft jhash", "haproxy", ...).
    pub peers: Vec<(String, f64)>,
    /// The ratio the target is about, with what it divides.
    pub ratio: Option<(String, f64)>,
    /// The target, as the issue states it, and whether it was met.
    pub target: Option<(String, bool)>,
    /// Bottleneck, method or caveat.
    pub note: String,
}

/// All rows of a run, plus when and where.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: String,
    pub mode: String,
    pub seconds: f64,
    pub rows: Vec<Row>,
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    pub fn push(&mut self, r: Row) {
        println!("  {}: {} {} {}", r.figure, fmt_num(r.clb), r.unit, r.note);
        self.rows.push(r);
    }

    /// A Markdown table of every row.
    pub fn table(&self) -> String {
        let mut out = String::new();
        writeln!(
            out,
            "| section | figure | clb | peers | ratio | target | note |"
        )
        .ok();
        writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |").ok();
        for r in &self.rows {
            let peers: Vec<String> = r
                .peers
                .iter()
                .map(|(n, v)| format!("{n} {}", fmt_num(*v)))
                .collect();
            let ratio = r
                .ratio
                .as_ref()
                .map(|(what, v)| format!("{v:.2}× {what}"))
                .unwrap_or_default();
            let target = r
                .target
                .as_ref()
                .map(|(t, ok)| format!("{t} {}", if *ok { "✓" } else { "✗" }))
                .unwrap_or_default();
            writeln!(
                out,
                "| {} | {} | {} {} | {} | {} | {} | {} |",
                r.section,
                r.figure,
                fmt_num(r.clb),
                r.unit,
                peers.join(", "),
                ratio,
                target,
                r.note
            )
            .ok();
        }
        out
    }

    /// Writes `bench.json` and `bench.md` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(self)?)?;
        let md = format!(
            "clb benchmark, {} run, {} on {} ({:.0} s)\n\n{}",
            self.mode,
            self.date,
            self.machine,
            self.seconds,
            self.table()
        );
        std::fs::write(dir.join("bench.md"), md)?;
        Ok(())
    }
}
