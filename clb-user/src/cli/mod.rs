//! The `clb` command line: `clb daemon` runs the balancer; every other command talks to a
//! running daemon through its API (the API validates; the CLI only parses and forwards) and
//! prints a table, or JSON with `--json` (the API's documented types, see `docs/api.md`).
//! Output to a closed pipe (`clb status | head -1`) ends the command quietly.

pub mod args;
pub mod render;

use std::io::Write as _;

use anyhow::Context as _;
use clap::CommandFactory as _;
use hyper::Method;

use self::args::{BackendCmd, BgpCmd, ConsoleCmd, ListenerCmd, SessionCmd, TableCmd};
pub use self::args::{Cli, Command};
use crate::{
    api::{
        client::{Client, ClientError, seg},
        types::{
            BackendPatch, BackendView, ConnView, DrainRequest, ForgetAnswer, ListenerView, Page,
            ReloadAnswer, SessionView, StatsResponse, Status,
        },
    },
    control::{
        audit::Event,
        model::{BackendSpec, ListenerSpec},
    },
    datapath::{loader, lock},
};

/// Writes `s` to stdout; a closed pipe ends the process quietly (exit 0): the reader has all
/// it wanted.
pub fn out(s: &str) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(s.as_bytes()).and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    out(&format!("{}\n", serde_json::to_string_pretty(v)?));
    Ok(())
}

/// Runs a client command. Errors carry the daemon's refusal message.
pub async fn run_client(cli: Cli) -> Result<(), ClientError> {
    let c = Client::new(&cli.api);
    match cli.command {
        Command::Daemon(_)
        | Command::Teardown { .. }
        | Command::Check { .. }
        | Command::Completions { .. }
        | Command::Man => {
            unreachable!("handled by main")
        }
        Command::Reload { dry_run, json } => {
            let path = if dry_run {
                "/v1/reload?dry_run=true"
            } else {
                "/v1/reload"
            };
            let a: ReloadAnswer = c.post(path).await?;
            if json {
                print_json(&a)?;
            } else {
                out(&render::reload(&a));
            }
        }
        Command::Apply {
            file,
            dry_run,
            json,
        } => {
            let doc = read_document(&file)?;
            let path = if dry_run {
                "/v1/apply?dry_run=true"
            } else {
                "/v1/apply"
            };
            let a: ReloadAnswer = c.exchange(Method::POST, path, &doc).await?;
            if json {
                print_json(&a)?;
            } else {
                out(&render::apply(&a));
            }
        }
        Command::Config => print!("{}", c.get_text("/v1/config").await?),
        Command::Status { events, json } => {
            let s: Status = c.get("/v1/status").await?;
            let events: Option<Vec<Event>> = match events {
                Some(n) => Some(c.get(&format!("/v1/events?limit={n}")).await?),
                None => None,
            };
            match (json, events) {
                (true, None) => print_json(&s)?,
                (true, Some(e)) => print_json(&serde_json::json!({ "status": s, "events": e }))?,
                (false, e) => {
                    out(&render::status(&s));
                    if let Some(e) = e {
                        out(&render::events(&e));
                    }
                }
            }
        }
        Command::Listener(cmd) => listener(&c, cmd).await?,
        Command::Backend(cmd) => backend(&c, cmd).await?,
        Command::Session(SessionCmd::Rm {
            listener,
            client,
            json,
        }) => forget(&c, &listener, Some(&client), json).await?,
        Command::Session(SessionCmd::Flush { listener, json }) => {
            forget(&c, &listener, None, json).await?
        }
        Command::Session(SessionCmd::Table(cmd)) => {
            let (q, json) = query(cmd);
            let p: Page<SessionView> = c.get(&format!("/v1/sessions{q}")).await?;
            if json {
                print_json(&p.items)?;
            } else {
                out(&render::sessions(&p.items));
                more(&p);
            }
        }
        Command::Conn(cmd) => {
            let (q, json) = query(cmd);
            let p: Page<ConnView> = c.get(&format!("/v1/conns{q}")).await?;
            if json {
                print_json(&p.items)?;
            } else {
                out(&render::conns(&p.items));
                more(&p);
            }
        }
        Command::Stats { json } => {
            let s: StatsResponse = c.get("/v1/stats").await?;
            if json {
                print_json(&s)?;
            } else {
                out(&render::stats(&s));
            }
        }
        Command::Console(ConsoleCmd::Link { json }) => {
            let l: crate::api::types::ConsoleLink = c.post("/v1/console/link").await?;
            if json {
                print_json(&l)?;
            } else {
                out(&format!(
                    "{}\n(one sign-in, within {} s)\n",
                    l.url, l.expires_in_secs
                ));
            }
        }
        Command::Bgp(cmd) => match cmd {
            BgpCmd::Withdraw => c.send_empty(Method::POST, "/v1/bgp/withdraw").await?,
            BgpCmd::Announce => c.send_empty(Method::POST, "/v1/bgp/announce").await?,
            BgpCmd::Status { json } => {
                let s: crate::bgp::BgpStatus = c.get("/v1/bgp").await?;
                if json {
                    print_json(&s)?;
                } else {
                    out(&render::bgp(&s));
                }
            }
        },
    }
    Ok(())
}

/// `clb session rm` / `flush`: forgets persisted clients of one listener.
async fn forget(
    c: &Client<'_>,
    listener: &str,
    client: Option<&str>,
    json: bool,
) -> Result<(), ClientError> {
    let mut path = format!("/v1/sessions?listener={}", seg(listener));
    if let Some(cl) = client {
        path.push_str(&format!("&client={}", seg(cl)));
    }
    let a: ForgetAnswer = c.delete(&path).await?;
    if json {
        print_json(&a)?;
    } else {
        out(&format!(
            "forgot {} persisted client entr{} of listener {listener}{}\n",
            a.removed,
            if a.removed == 1 { "y" } else { "ies" },
            client.map(|c| format!(" in {c}")).unwrap_or_default()
        ));
    }
    Ok(())
}

fn query(cmd: TableCmd) -> (String, bool) {
    let TableCmd::Ls {
        listener,
        client,
        backend,
        limit,
        offset,
        json,
    } = cmd;
    let mut q = Vec::new();
    if let Some(l) = listener {
        q.push(format!("listener={}", seg(&l)));
    }
    if let Some(c) = client {
        q.push(format!("client={}", seg(&c)));
    }
    if let Some(b) = backend {
        q.push(format!("backend={}", seg(&b.to_string())));
    }
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    if let Some(o) = offset {
        q.push(format!("offset={o}"));
    }
    let q = if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    };
    (q, json)
}

fn more<T>(p: &Page<T>) {
    let shown = p.offset + p.items.len() as u64;
    if shown < p.total {
        out(&format!(
            "({} of {} shown; --offset {shown} for more)\n",
            p.items.len(),
            p.total
        ));
    }
}

async fn listener(c: &Client<'_>, cmd: ListenerCmd) -> Result<(), ClientError> {
    match cmd {
        ListenerCmd::Add {
            name,
            vip,
            proto,
            opts,
        } => {
            let mut fields = opts.fields();
            let refused = |message: String| ClientError::Refused {
                status: 400,
                message,
            };
            if let Some(certs) = opts.cert_list(Vec::new()).map_err(refused)? {
                fields.insert("certificate".into(), serde_json::json!(certs));
            }
            fields.insert("name".into(), name.into());
            fields.insert("vip".into(), vip.to_string().into());
            fields.insert("proto".into(), proto.to_string().into());
            // Parsed here first: a field that does not apply to the protocol is named now.
            let spec: ListenerSpec = serde_json::from_value(serde_json::Value::Object(fields))
                .map_err(|e| ClientError::Refused {
                    status: 400,
                    message: e.to_string(),
                })?;
            c.send(Method::POST, "/v1/listeners", &spec).await
        }
        ListenerCmd::Set { name, opts } => {
            let mut fields = opts.fields();
            let current = if opts.edits_certs() {
                let v: ListenerView = c.get(&format!("/v1/listeners/{}", seg(&name))).await?;
                v.certificates
                    .into_iter()
                    .map(|x| {
                        (
                            x.name,
                            crate::certs::CertSpec {
                                cert: x.cert.into(),
                                key: x.key.into(),
                            },
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let certs = opts
                .cert_list(current)
                .map_err(|message| ClientError::Refused {
                    status: 400,
                    message,
                })?;
            if let Some(certs) = certs {
                fields.insert("certificate".into(), serde_json::json!(certs));
            }
            c.send(
                Method::PATCH,
                &format!("/v1/listeners/{}", seg(&name)),
                &serde_json::Value::Object(fields),
            )
            .await
        }
        ListenerCmd::Rm { name } => {
            c.send_empty(Method::DELETE, &format!("/v1/listeners/{}", seg(&name)))
                .await
        }
        ListenerCmd::Ls { json } => {
            let v: Vec<ListenerView> = c.get("/v1/listeners").await?;
            if json {
                print_json(&v)?;
            } else {
                out(&render::listeners(&v));
            }
            Ok(())
        }
    }
}

async fn backend(c: &Client<'_>, cmd: BackendCmd) -> Result<(), ClientError> {
    let path = |l: &str, a: &std::net::SocketAddr| {
        format!("/v1/listeners/{}/backends/{}", seg(l), seg(&a.to_string()))
    };
    match cmd {
        BackendCmd::Add {
            listener,
            addrs,
            weight,
        } => {
            let specs: Vec<BackendSpec> = addrs
                .into_iter()
                .map(|a| BackendSpec::new(a, weight.unwrap_or(clb_common::DEFAULT_WEIGHT)))
                .collect();
            let path = format!("/v1/listeners/{}/backends", seg(&listener));
            match specs.as_slice() {
                [one] => c.send(Method::POST, &path, one).await,
                _ => c.send(Method::POST, &path, &specs).await,
            }
        }
        BackendCmd::Set {
            listener,
            addr,
            weight,
            state,
        } => {
            c.send(
                Method::PATCH,
                &path(&listener, &addr),
                &BackendPatch { weight, state },
            )
            .await
        }
        BackendCmd::Rm { listener, addr } => {
            c.send_empty(Method::DELETE, &path(&listener, &addr)).await
        }
        BackendCmd::Drain {
            listener,
            addr,
            timeout,
            now,
        } => {
            c.send(
                Method::POST,
                &format!("{}/drain", path(&listener, &addr)),
                &DrainRequest { timeout, now },
            )
            .await
        }
        BackendCmd::Ls { listener, json } => {
            let v: Vec<BackendView> = c
                .get(&format!("/v1/listeners/{}/backends", seg(&listener)))
                .await?;
            if json {
                print_json(&v)?;
            } else {
                out(&render::backends(&v));
            }
            Ok(())
        }
    }
}

/// `clb teardown`: refused for a directory that is not a clb pin directory, and while a daemon
/// runs on it unless `force`.
pub fn teardown(bpffs: &std::path::Path, force: bool) -> anyhow::Result<()> {
    loader::check_pin_dir(bpffs)?;
    if lock::pin_dir_in_use(bpffs)? && !force {
        anyhow::bail!(
            "a clb daemon is running on {}: stop it first, or pass --force (the daemon then reports the datapath detached)",
            bpffs.display()
        );
    }
    let t = loader::teardown(bpffs).with_context(|| format!("tearing down {}", bpffs.display()))?;
    out(&format!(
        "removed {} link(s) [{}] and {} map pin(s) under {}\n",
        t.links.len(),
        t.links.join(", "),
        t.maps.len(),
        bpffs.display()
    ));
    Ok(())
}

/// `clb check --config FILE`: the daemon's own reading of the file (`ConfigFile::load`: TOML,
/// then every validation a start or a reload applies), then each HTTPS listener's
/// certificates, loaded as a start would.
pub fn check(path: &std::path::Path) -> anyhow::Result<()> {
    // `{e}` holds the whole reason; its source chain would repeat it.
    let cfg = crate::control::file::ConfigFile::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let now = std::time::SystemTime::now();
    let mut problems = Vec::new();
    for l in &cfg.listeners {
        let Some(h) = l.http().filter(|h| h.tls) else {
            continue;
        };
        for c in &h.certs {
            if let Err(e) = crate::certs::load(c, now) {
                problems.push(format!("listener {:?}: certificate: {e}", l.name));
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{}: {}", path.display(), problems.join("; "));
    }
    let backends: usize = cfg.listeners.iter().map(|l| l.backends.len()).sum();
    out(&format!(
        "{}: ok ({} listener(s), {backends} backend(s))\n",
        path.display(),
        cfg.listeners.len()
    ));
    Ok(())
}

/// `clb completions SHELL`.
pub fn completions(shell: clap_complete::Shell) {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "clb", &mut buf);
    out(&String::from_utf8_lossy(&buf));
}

/// `clb man`.
pub fn man() -> anyhow::Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut buf)?;
    out(&String::from_utf8_lossy(&buf));
    Ok(())
}

/// A listener document for `clb apply`, as JSON: a `.json` file as it is, anything else read
/// as TOML (its errors carry the line and column). `-` is standard input (TOML).
fn read_document(file: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the document from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let at = file.display();
    if file.extension().is_some_and(|e| e == "json") {
        return serde_json::from_str(&text).with_context(|| format!("{at}: not JSON"));
    }
    let doc: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{at}: {}", e.to_string().trim().replace('\n', " ")))?;
    serde_json::to_value(doc).with_context(|| format!("{at}: converting to JSON"))
}
