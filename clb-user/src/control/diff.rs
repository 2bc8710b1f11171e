//! What a change does to the configuration, field by field: the lines `clb reload` (and
//! `--dry-run`) prints and the audit log records.
//!
//! Both configurations are compared as the config file spells them (the same serialization
//! [`ConfigFile::to_toml`] writes), so a line names a field by the key an operator edits.
//! Listeners, backends, BGP peers and certificates are matched by identity (name or
//! address), not by position: reordering them is no change.

use toml::{Table, Value};

use crate::control::file::ConfigFile;

/// The keys that identify an element of an array of tables, in the order they are tried.
const IDENTITY: [&str; 3] = ["name", "addr", "address"];

/// The changes from `old` to `new`, one line each (a table's plain fields first, then its
/// elements, each in key order); empty when they mean the same.
pub fn diff(old: &ConfigFile, new: &ConfigFile) -> Vec<String> {
    let mut out = Vec::new();
    match (as_table(old), as_table(new)) {
        (Some(a), Some(b)) => tables("", &a, &b, &mut out),
        _ if old != new => out.push("configuration changed".into()),
        _ => {}
    }
    out
}

fn as_table(c: &ConfigFile) -> Option<Table> {
    match Value::try_from(c).ok()? {
        Value::Table(t) => Some(t),
        _ => None,
    }
}

/// `path key`: where a nested field or element is.
fn joined(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path} {key}")
    }
}

fn tables(path: &str, a: &Table, b: &Table, out: &mut Vec<String>) {
    // Plain fields first, then the elements (listeners, backends, peers); each in key order.
    let mut keys: Vec<&String> = b
        .keys()
        .chain(a.keys().filter(|k| !b.contains_key(*k)))
        .collect();
    let elements = |k: &String| {
        [a.get(k), b.get(k)]
            .into_iter()
            .flatten()
            .any(|v| matches!(v, Value::Array(x) if !x.is_empty() && identified(x)))
    };
    keys.sort_by_key(|k| (elements(k), k.as_str()));
    for key in keys {
        match (a.get(key), b.get(key)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(Value::Table(x)), Some(Value::Table(y))) => tables(&joined(path, key), x, y, out),
            (Some(Value::Array(x)), Some(Value::Array(y))) if identified(x) && identified(y) => {
                arrays(&joined(path, key), x, y, out)
            }
            (None, Some(Value::Table(y))) => {
                out.push(format!("{} added{}", joined(path, key), summary(y)))
            }
            (Some(Value::Table(_)), None) => out.push(format!("{} removed", joined(path, key))),
            (None, Some(Value::Array(y))) if identified(y) => {
                arrays(&joined(path, key), &[], y, out)
            }
            (Some(Value::Array(x)), None) if identified(x) => {
                arrays(&joined(path, key), x, &[], out)
            }
            (x, y) => out.push(format!(
                "{}{key} {} → {}",
                if path.is_empty() {
                    String::new()
                } else {
                    format!("{path}: ")
                },
                x.map_or("(unset)".into(), show),
                y.map_or("(unset)".into(), show)
            )),
        }
    }
}

/// Whether every element of an array is a table with an identity (an empty array is).
fn identified(items: &[Value]) -> bool {
    items.iter().all(|v| id_of(v).is_some())
}

fn id_of(v: &Value) -> Option<(&Table, String)> {
    let t = v.as_table()?;
    IDENTITY
        .into_iter()
        .find_map(|k| t.get(k))
        .map(|id| (t, show(id)))
}

fn arrays(path: &str, a: &[Value], b: &[Value], out: &mut Vec<String>) {
    let olds: Vec<_> = a.iter().filter_map(id_of).collect();
    let news: Vec<_> = b.iter().filter_map(id_of).collect();
    for (t, id) in &news {
        match olds.iter().find(|(_, o)| o == id) {
            Some((o, _)) => tables(&format!("{path} {id}"), o, t, out),
            None => out.push(format!("{path} {id} added{}", summary(t))),
        }
    }
    for (_, id) in olds
        .iter()
        .filter(|(_, o)| !news.iter().any(|(_, n)| n == o))
    {
        out.push(format!("{path} {id} removed"));
    }
}

/// `(key value, …, N backend)` of an added element: its plain fields and how many of each
/// kind of element it holds, its identity left out.
fn summary(t: &Table) -> String {
    let mut parts = Vec::new();
    for (k, v) in t {
        match v {
            _ if IDENTITY.contains(&k.as_str()) => {}
            Value::Table(_) => {}
            Value::Array(items) if items.iter().all(Value::is_table) => {
                parts.push(format!("{} {k}", items.len()))
            }
            v => parts.push(format!("{k} {}", show(v))),
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// A value as the file spells it, strings without their quotes.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ConfigFile {
        ConfigFile::parse(s).expect("valid config")
    }

    const BASE: &str = r#"
[[listener]]
name = "web"
vip = "10.0.0.1:80"
proto = "tcp"
persist = 0

[[listener.backend]]
addr = "10.0.1.1:80"
weight = 1

[[listener.backend]]
addr = "10.0.1.2:80"
weight = 1
"#;

    #[test]
    fn the_same_meaning_is_no_change() {
        assert!(diff(&parse(BASE), &parse(BASE)).is_empty());
        // Reordered backends are the same listener.
        let swapped = BASE
            .replace("10.0.1.1:80", "X")
            .replace("10.0.1.2:80", "10.0.1.1:80")
            .replace("X", "10.0.1.2:80");
        assert!(diff(&parse(BASE), &parse(&swapped)).is_empty());
    }

    #[test]
    fn fields_backends_and_listeners_are_named() {
        let next = BASE
            .replace("persist = 0", "persist = 600")
            .replace(
                "addr = \"10.0.1.2:80\"\nweight = 1",
                "addr = \"10.0.1.2:80\"\nweight = 3",
            )
            .replace("addr = \"10.0.1.1:80\"", "addr = \"10.0.1.9:80\"")
            + "\n[[listener]]\nname = \"dns\"\nvip = \"10.0.0.1:53\"\nproto = \"udp\"\n";
        let d = diff(&parse(BASE), &parse(&next));
        assert_eq!(
            d,
            vec![
                "listener web: persist 0 → 600",
                "listener web backend 10.0.1.9:80 added (weight 1)",
                "listener web backend 10.0.1.2:80: weight 1 → 3",
                "listener web backend 10.0.1.1:80 removed",
                "listener dns added (persist 0, proto udp, vip 10.0.0.1:53)",
            ],
            "{d:#?}"
        );
        assert_eq!(diff(&parse(&next), &parse(BASE)).len(), 5);
        assert_eq!(diff(&parse(BASE), &parse("")), vec!["listener web removed"]);
    }
}
