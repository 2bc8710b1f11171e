//! The config file is edited, not regenerated: a change writes the new configuration into
//! the file's existing text, so comments, order, blank lines and the spelling of everything
//! the change did not touch stay as the operator wrote them.
//!
//! How: the old text and the new configuration's canonical TOML are both read as
//! `toml_edit` documents and the new one is merged into the old, table by table:
//!
//! - A table that still means the same thing (deserialized as its type — a listener, a
//!   backend, `[tables]`, `[bgp]`, a peer — it equals the new one) is kept byte for byte.
//! - Otherwise its values are compared key by key: a changed value is replaced and keeps its
//!   line's decoration (the comment after it, the comments above it); a key the new
//!   configuration has and the old text lacks is added; a key the old text has and the new
//!   one lacks is removed unless keeping it still means the same (an explicit default such as
//!   `sched = "wrr"` stays). Keys the canonical form always writes (a listener's whole
//!   `[health_check]`, a backend's `weight`) are added only where the meaning needs them.
//! - Arrays of tables are matched by identity — listeners by `name`, backends and peers by
//!   address — so a listener or backend added, removed or reordered leaves the others' text
//!   alone; new ones come in the new configuration's order, in its canonical form.
//!
//! The result is read back and must equal the new configuration; if it does not (a file
//! spelled in a way the merge does not follow), the caller writes the canonical form instead.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, Value};

use crate::control::{
    file::ConfigFile,
    model::{BackendSpec, BgpPeer, BgpSpec, ListenerSpec, TablesSpec},
};

/// `old` (the file's text) with `new` written into it, or `None` when `old` is not TOML or
/// the merge would not read back as `new`.
pub fn edit(old: &str, new: &ConfigFile) -> Option<String> {
    let mut doc: DocumentMut = old.parse().ok()?;
    let fresh: DocumentMut = new.body().parse().ok()?;
    merge_root(doc.as_table_mut(), fresh.as_table(), new);
    renumber(doc.as_table_mut(), &mut 0);
    let text = doc.to_string();
    (ConfigFile::parse(&text).ok()? == *new).then_some(text)
}

/// What kind of table sits at a path of keys (array indices left out), for the tables that
/// have a type of their own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Listener,
    Backend,
    Tables,
    Bgp,
    Peer,
}

impl Kind {
    fn at(path: &[&str]) -> Option<Self> {
        Some(match path {
            ["listener"] => Self::Listener,
            ["listener", "backend"] => Self::Backend,
            ["tables"] => Self::Tables,
            ["bgp"] => Self::Bgp,
            ["bgp", "peer"] => Self::Peer,
            _ => return None,
        })
    }

    /// Whether `a` and `b` deserialize to the same value of this kind.
    fn same(self, a: &Table, b: &Table) -> bool {
        fn eq<T: DeserializeOwned + PartialEq>(a: &Table, b: &Table) -> bool {
            match (read::<T>(a), read::<T>(b)) {
                (Some(x), Some(y)) => x == y,
                _ => false,
            }
        }
        match self {
            Self::Listener => eq::<ListenerSpec>(a, b),
            Self::Backend => eq::<BackendSpec>(a, b),
            Self::Tables => eq::<TablesSpec>(a, b),
            Self::Bgp => eq::<BgpSpec>(a, b),
            Self::Peer => eq::<BgpPeer>(a, b),
        }
    }

    /// The key whose value names an element of an array of this kind.
    fn identity(self, t: &Table) -> Option<String> {
        let s = |k: &str| t.get(k).and_then(Item::as_str).map(str::to_owned);
        match self {
            Self::Listener => s("name"),
            Self::Backend => {
                s("addr").map(|a| a.parse::<SocketAddr>().map(|a| a.to_string()).unwrap_or(a))
            }
            Self::Peer => s("address"),
            Self::Tables | Self::Bgp => None,
        }
    }
}

fn read<T: DeserializeOwned>(t: &Table) -> Option<T> {
    let mut root = t.clone();
    root.decor_mut().clear();
    toml::from_str(&DocumentMut::from(root).to_string()).ok()
}

/// The top level: `[tables]`, `[bgp]` and the listeners. A top-level table the new
/// configuration leaves out (`[tables]` at its defaults, no `[bgp]`) is kept when what it
/// says is what the new configuration means.
fn merge_root(old: &mut Table, new: &Table, cfg: &ConfigFile) {
    let gone: Vec<String> = old
        .iter()
        .map(|(k, _)| k.to_owned())
        .filter(|k| !new.contains_key(k))
        .collect();
    for k in gone {
        let keep = match (k.as_str(), old.get(&k)) {
            ("tables", Some(Item::Table(t))) => {
                read::<TablesSpec>(t).is_some_and(|t| t == cfg.tables)
            }
            ("bgp", _) => false,
            ("listener", Some(Item::ArrayOfTables(a))) => a.is_empty() && cfg.listeners.is_empty(),
            _ => false,
        };
        if !keep {
            old.remove(&k);
        }
    }
    for (k, item) in new.iter() {
        let path = [k];
        match (old.get_mut(k), item) {
            (Some(Item::Table(o)), Item::Table(n)) => merge_typed(o, n, &path),
            (Some(Item::ArrayOfTables(o)), Item::ArrayOfTables(n)) => merge_array(o, n, &path),
            (Some(o), _) if same_item(o, item) => {}
            _ => {
                old.insert(k, fresh(item));
            }
        }
    }
}

/// A table of a known kind (or, without one, merged into by key).
fn merge_typed(old: &mut Table, new: &Table, path: &[&str]) {
    let Some(kind) = Kind::at(path) else {
        merge_keys(old, new, path, &mut Vec::new(), &mut Vec::new());
        return;
    };
    if kind.same(old, new) {
        return;
    }
    let mut added = Vec::new();
    let mut gone = Vec::new();
    let before = old.clone();
    merge_keys(old, new, path, &mut added, &mut gone);
    // The merged table now holds every key of `new` with its value and none it lacks; drop
    // what was added but is not needed for the meaning, then put back what the old text said
    // and still may.
    for p in added {
        if let Some(item) = take(old, &p)
            && !kind.same(old, new)
        {
            put(old, &p, item);
        }
    }
    let keep: Vec<Vec<String>> = gone
        .into_iter()
        .filter(|p| {
            let mut trial = old.clone();
            match find(&before, p) {
                Some(item) => {
                    put(&mut trial, p, item.clone());
                    kind.same(&trial, new)
                }
                None => false,
            }
        })
        .collect();
    if !keep.is_empty() {
        // Start again from the old text, removing only what must go, so kept keys stay where
        // they were.
        let merged = old.clone();
        *old = before;
        restore(old, &merged, &keep, &mut Vec::new());
    }
}

/// `old` becomes `merged`, except at the paths in `keep`, which stay as they are in `old`.
fn restore(old: &mut Table, merged: &Table, keep: &[Vec<String>], at: &mut Vec<String>) {
    let keys: Vec<String> = old.iter().map(|(k, _)| k.to_owned()).collect();
    for k in keys {
        at.push(k.clone());
        let kept = keep.contains(at);
        match (old.get_mut(&k), merged.get(&k)) {
            _ if kept => {}
            (Some(Item::Table(o)), Some(Item::Table(m)))
                if keep.iter().any(|p| p.starts_with(at)) =>
            {
                restore(o, m, keep, at)
            }
            (_, Some(m)) => {
                old.insert(&k, m.clone());
            }
            (_, None) => {
                old.remove(&k);
            }
        }
        at.pop();
    }
    for (k, m) in merged.iter() {
        if !old.contains_key(k) {
            old.insert(k, m.clone());
        }
    }
}

/// Key by key: values replaced keeping their decoration, keys added (`added` gets their
/// paths, and for an added table those of its values too) and removed (`gone`).
fn merge_keys(
    old: &mut Table,
    new: &Table,
    path: &[&str],
    added: &mut Vec<Vec<String>>,
    gone: &mut Vec<Vec<String>>,
) {
    merge_keys_at(old, new, path, &mut Vec::new(), added, gone);
}

fn merge_keys_at(
    old: &mut Table,
    new: &Table,
    path: &[&str],
    rel: &mut Vec<String>,
    added: &mut Vec<Vec<String>>,
    gone: &mut Vec<Vec<String>>,
) {
    let removed: Vec<String> = old
        .iter()
        .map(|(k, _)| k.to_owned())
        .filter(|k| !new.contains_key(k))
        .collect();
    for k in removed {
        old.remove(&k);
        gone.push(with(rel, &k));
    }
    for (k, item) in new.iter() {
        let mut sub: Vec<&str> = path.to_vec();
        sub.push(k);
        match (old.get_mut(k), item) {
            (Some(Item::Value(o)), Item::Value(n)) => {
                if !same_value(o, n) {
                    let decor = realigned(o, n);
                    *o = n.clone();
                    *o.decor_mut() = decor;
                }
            }
            (Some(Item::Table(o)), Item::Table(n)) => {
                if Kind::at(&sub).is_some() {
                    merge_typed(o, n, &sub);
                } else {
                    rel.push(k.to_owned());
                    merge_keys_at(o, n, &sub, rel, added, gone);
                    rel.pop();
                }
            }
            (Some(Item::ArrayOfTables(o)), Item::ArrayOfTables(n)) => merge_array(o, n, &sub),
            (Some(o), _) if same_item(o, item) => {}
            (Some(_), _) => {
                old.insert(k, fresh(item));
            }
            (None, _) => {
                old.insert(k, fresh(item));
                let p = with(rel, k);
                added.push(p.clone());
                if let Item::Table(t) = item {
                    for (v, _) in t.iter() {
                        let mut q = p.clone();
                        q.push(v.to_owned());
                        added.push(q);
                    }
                }
            }
        }
    }
}

/// An array of tables: elements matched by identity (or position, for kinds without one),
/// merged as tables; new elements in the new order.
fn merge_array(old: &mut ArrayOfTables, new: &ArrayOfTables, path: &[&str]) {
    let kind = Kind::at(path);
    let mut pool: Vec<Option<Table>> = std::mem::take(old).into_iter().map(Some).collect();
    let ids: Vec<Option<String>> = pool
        .iter()
        .map(|t| kind.and_then(|k| t.as_ref().and_then(|t| k.identity(t))))
        .collect();
    for (i, n) in new.iter().enumerate() {
        let id = kind.and_then(|k| k.identity(n));
        let pos = match &id {
            Some(id) => ids
                .iter()
                .enumerate()
                .position(|(j, o)| o.as_ref() == Some(id) && pool[j].is_some()),
            None => (i < pool.len() && pool[i].is_some()).then_some(i),
        };
        match pos.and_then(|j| pool[j].take()) {
            Some(mut o) => {
                merge_typed(&mut o, n, path);
                old.push(o);
            }
            None => old.push(fresh_table(n)),
        }
    }
}

/// Renumbers the tables' positions in the document's logical order (a table before its
/// sub-tables, array elements in order), so that tables merged in from the canonical text
/// are written where they belong.
fn renumber(t: &mut Table, n: &mut isize) {
    for (_, item) in t.iter_mut() {
        match item {
            Item::Table(s) => {
                if !s.is_implicit() {
                    s.set_position(Some(*n));
                    *n += 1;
                }
                renumber(s, n);
            }
            Item::ArrayOfTables(a) => {
                for s in a.iter_mut() {
                    s.set_position(Some(*n));
                    *n += 1;
                    renumber(s, n);
                }
            }
            _ => {}
        }
    }
}

fn with(rel: &[String], k: &str) -> Vec<String> {
    let mut p = rel.to_vec();
    p.push(k.to_owned());
    p
}

/// `old`'s decoration for `new` in its place: a comment after the value stays in its column
/// (the spaces before it take up the difference in width, at least one kept).
fn realigned(old: &Value, new: &Value) -> toml_edit::Decor {
    let mut decor = old.decor().clone();
    let width = |v: &Value| bare(v).chars().count() as isize;
    let suffix = decor.suffix().and_then(|s| s.as_str()).map(str::to_owned);
    if let Some(suffix) = suffix {
        let pad = suffix.len() - suffix.trim_start_matches(' ').len();
        if pad > 0 && suffix[pad..].starts_with('#') {
            let pad = (pad as isize + width(old) - width(new)).max(1) as usize;
            decor.set_suffix(format!(
                "{}{}",
                " ".repeat(pad),
                suffix.trim_start_matches(' ')
            ));
        }
    }
    decor
}

fn bare(v: &Value) -> String {
    let mut v = v.clone();
    v.decor_mut().clear();
    v.to_string()
}

fn same_value(a: &Value, b: &Value) -> bool {
    bare(a) == bare(b)
}

fn same_item(a: &Item, b: &Item) -> bool {
    match (a, b) {
        (Item::Value(x), Item::Value(y)) => same_value(x, y),
        _ => false,
    }
}

fn fresh(item: &Item) -> Item {
    match item {
        Item::Table(t) => Item::Table(fresh_table(t)),
        Item::ArrayOfTables(a) => {
            let mut out = ArrayOfTables::new();
            for t in a.iter() {
                out.push(fresh_table(t));
            }
            Item::ArrayOfTables(out)
        }
        other => other.clone(),
    }
}

fn fresh_table(t: &Table) -> Table {
    let mut t = t.clone();
    t.set_position(None);
    t
}

fn find<'a>(t: &'a Table, path: &[String]) -> Option<&'a Item> {
    let (last, head) = path.split_last()?;
    let mut cur = t;
    for k in head {
        cur = cur.get(k)?.as_table()?;
    }
    cur.get(last)
}

fn take(t: &mut Table, path: &[String]) -> Option<Item> {
    let (last, head) = path.split_last()?;
    let mut cur = t;
    for k in head {
        cur = cur.get_mut(k)?.as_table_mut()?;
    }
    cur.remove(last)
}

fn put(t: &mut Table, path: &[String], item: Item) {
    let Some((last, head)) = path.split_last() else {
        return;
    };
    let mut cur = t;
    for k in head {
        match cur.get_mut(k).and_then(Item::as_table_mut) {
            Some(next) => cur = next,
            None => return,
        }
    }
    cur.insert(last, item);
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMENTED: &str = r#"# Production balancer, reviewed 2026-11-30 (ticket OPS-41).

[tables]
connections = 1048576   # the default, written down on purpose

# The shop. Cart state lives on the backend: keep persistence on.
[[listener]]
name = "web"
vip = "10.0.0.100:80"
proto = "tcp"
persist = 600          # seconds, 0 = off
sched = "wrr"          # explicit default

# rack A
[[listener.backend]]
addr = "10.0.10.2:8080"

# rack B, smaller box
[[listener.backend]]
addr = "10.0.11.2:8080"
weight = 5             # half of rack A

# DNS
[[listener]]
name = "dns"
vip = "10.0.0.100:53"
proto = "udp"

[[listener.backend]]
addr = "10.0.10.2:53"
"#;

    fn cfg(text: &str) -> ConfigFile {
        ConfigFile::parse(text).unwrap()
    }

    fn edited(old: &str, new: &ConfigFile) -> String {
        let text = edit(old, new).expect("the merge reads back");
        assert_eq!(cfg(&text), *new);
        text
    }

    #[test]
    fn an_unchanged_configuration_leaves_the_text_byte_for_byte() {
        assert_eq!(edited(COMMENTED, &cfg(COMMENTED)), COMMENTED);
    }

    #[test]
    fn a_changed_value_keeps_its_comment_and_everything_else() {
        let mut c = cfg(COMMENTED);
        c.listeners[0].persist = 900;
        let text = edited(COMMENTED, &c);
        assert_eq!(
            text,
            COMMENTED.replace(
                "persist = 600          # seconds",
                "persist = 900          # seconds"
            )
        );
    }

    #[test]
    fn ten_changes_of_different_kinds_keep_every_comment() {
        let mut text = COMMENTED.to_owned();
        type Step = Box<dyn Fn(&mut ConfigFile)>;
        let steps: Vec<Step> = vec![
            Box::new(|c| c.listeners[0].persist = 300),
            Box::new(|c| c.listeners[0].backends[1].weight = 7),
            Box::new(|c| {
                c.listeners[0].backends.push(BackendSpec::new(
                    "10.0.12.2:8080".parse::<SocketAddr>().unwrap(),
                    10,
                ))
            }),
            Box::new(|c| {
                c.listeners[1].backends.remove(0);
            }),
            Box::new(|c| c.listeners[0].health_check.interval = 3),
            Box::new(|c| c.listeners[1].slow_start = 30),
            Box::new(|c| {
                let mut l = ListenerSpec::new(
                    "api",
                    "10.0.0.101:443".parse::<SocketAddr>().unwrap(),
                    crate::control::model::Proto::Tcp,
                );
                l.backends.push(BackendSpec::new(
                    "10.0.10.3:443".parse::<SocketAddr>().unwrap(),
                    10,
                ));
                c.listeners.push(l);
            }),
            Box::new(|c| c.listeners[0].backends[0].weight = 0),
            Box::new(|c| {
                c.listeners.retain(|l| l.name != "api");
            }),
            Box::new(|c| c.listeners[0].persist = 0),
        ];
        for (i, step) in steps.iter().enumerate() {
            let mut c = cfg(&text);
            step(&mut c);
            text = edited(&text, &c);
            for comment in [
                "# Production balancer, reviewed 2026-11-30 (ticket OPS-41).",
                "# the default, written down on purpose",
                "# The shop. Cart state lives on the backend: keep persistence on.",
                "# rack A",
                "# rack B, smaller box",
                "# half of rack A",
                "# explicit default",
                "# DNS",
            ] {
                assert!(text.contains(comment), "step {i} lost {comment:?}:\n{text}");
            }
        }
        // Only what was changed was written: no health-check table for the listener whose
        // check was not changed, no weight for the backend that had none.
        assert!(text.contains("interval = 3"), "{text}");
        assert_eq!(text.matches("[listener.health_check]").count(), 1, "{text}");
        assert!(text.contains("addr = \"10.0.12.2:8080\""), "{text}");
        assert!(!text.contains("api"), "{text}");
        assert!(text.contains("slow_start = 30"), "{text}");
        assert!(
            text.contains("weight = 7             # half of rack A"),
            "{text}"
        );
        assert!(text.contains("persist = 0            # seconds"), "{text}");
    }

    #[test]
    fn a_listener_removed_takes_its_text_and_leaves_the_others() {
        let mut c = cfg(COMMENTED);
        c.listeners.remove(0);
        let text = edited(COMMENTED, &c);
        assert!(!text.contains("The shop"), "{text}");
        assert!(text.contains("# DNS"), "{text}");
        assert!(text.starts_with("# Production balancer"), "{text}");
    }

    #[test]
    fn an_explicit_default_that_is_changed_is_rewritten_in_place() {
        let mut c = cfg(COMMENTED);
        if let crate::control::model::Kind::L4(l) = &mut c.listeners[0].kind {
            l.sched = crate::control::model::Sched::Lc;
        }
        let text = edited(COMMENTED, &c);
        assert!(
            text.contains("sched = \"lc\"           # explicit default"),
            "{text}"
        );
    }

    #[test]
    fn text_that_is_not_toml_is_not_merged() {
        assert!(edit("[[listener]\nname =", &cfg(COMMENTED)).is_none());
    }
}
