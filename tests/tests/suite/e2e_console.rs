//! The web console, in a real browser (headless Chromium over WebDriver) and over plain HTTP:
//! the cloud console's steps — sign in, Modify on a TCP listener, persistence on, 600, OK —
//! then the CLI shows the change and a client's connections stick; an out-of-range duration is
//! refused and changes nothing; without signing in nothing can be changed; missing or wrong
//! CSRF tokens, expired sessions, unknown listeners and repeated failed sign-ins are refused.
//! The browser test saves the README's screenshots under `target/screenshots/`.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use clb_tests::{
    browser::Driver,
    daemon::Daemon,
    netns::{Topology, VIP, backend_ip},
    servers::{NameServer, ask_once},
};
use fantoccini::{Client, Locator};

const CONSOLE: &str = "127.0.0.1:9902";
/// Session idle timeout given to the daemon (the browser polls every 2 s, so its session lives).
const IDLE_SECS: u64 = 4;

fn config() -> String {
    let mut s = String::new();
    for (name, port, proto) in [("web", 80, "tcp"), ("dns", 53, "udp")] {
        s += &format!(
            "[[listener]]\nname = \"{name}\"\nvip = \"{VIP}:{port}\"\nproto = \"{proto}\"\n"
        );
        for i in 0..3 {
            s += &format!(
                "[[listener.backend]]\naddr = \"{}:{}\"\n",
                backend_ip(i),
                if proto == "tcp" { 8080 } else { 5353 }
            );
        }
    }
    s
}

struct Env {
    d: Daemon,
    topo: Topology,
    _servers: Vec<NameServer>,
    token: String,
}

fn env(tag: &str) -> Env {
    let topo = Topology::new(tag, 3, 5).unwrap();
    let servers = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            NameServer::tcp(
                ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080),
                &format!("b{i}"),
            )
            .unwrap()
        })
        .collect();
    let idle = IDLE_SECS.to_string();
    let d = Daemon::start_with(
        &topo,
        &config(),
        &["--console", CONSOLE, "--console-session-idle", &idle],
    );
    let token_file = d.dir().join("state").join("console.token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token file is readable by others");
    Env {
        d,
        topo,
        _servers: servers,
        token,
    }
}

fn persist(d: &Daemon, name: &str) -> u64 {
    let ls: Vec<serde_json::Value> = d.clb_json(&["listener", "ls"]);
    ls.iter().find(|l| l["name"] == name).unwrap()["persist"]
        .as_u64()
        .unwrap()
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `f` with a fresh browser, on a thread in the balancer's namespace.
fn with_browser<T: Send>(
    e: &Env,
    driver: &Driver,
    f: impl AsyncFnOnce(&Client) -> anyhow::Result<T> + Send,
) -> T {
    e.topo.lb.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = driver.browser().await.expect("a browser session");
            let r = f(&c).await;
            c.close().await.ok();
            r.unwrap_or_else(|err| panic!("{err:#}\nchromedriver:\n{}", driver.log()))
        })
    })
}

async fn sign_in(c: &Client, token: &str) -> anyhow::Result<()> {
    c.goto(&format!("http://{CONSOLE}/")).await?;
    let field = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id("login-token"))
        .await?;
    field.send_keys(token).await?;
    c.find(Locator::Id("login-submit")).await?.click().await?;
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(
            "tr[data-listener='web'] td[data-col='persist']",
        ))
        .await?;
    Ok(())
}

/// Opens Modify on `listener`, sets persistence on with `value`, clicks OK.
async fn modify(c: &Client, listener: &str, value: &str) -> anyhow::Result<()> {
    c.find(Locator::Css(&format!(
        "button.modify[data-listener='{listener}']"
    )))
    .await?
    .click()
    .await?;
    let switch = c.find(Locator::Id("persist-enabled")).await?;
    if switch.prop("checked").await?.as_deref() != Some("true") {
        switch.click().await?;
    }
    let dur = c.find(Locator::Id("persist-duration")).await?;
    dur.clear().await?;
    dur.send_keys(value).await?;
    Ok(())
}

async fn text_of(c: &Client, css: &str) -> anyhow::Result<String> {
    Ok(c.find(Locator::Css(css)).await?.text().await?)
}

#[test]
fn console_modify_persistence_in_a_browser() {
    let e = env("cb");
    let driver = Driver::start(&e.topo.lb).unwrap();
    assert_eq!(persist(&e.d, "web"), 0);
    // Wait for a sample or two of the charts' series.
    std::thread::sleep(Duration::from_secs(1));
    let shots = screenshots();
    let token = e.token.clone();
    with_browser(&e, &driver, async |c| {
        sign_in(c, &token).await?;
        assert_eq!(
            text_of(c, "tr[data-listener='web'] td[data-col='persist']").await?,
            "off"
        );
        assert_eq!(
            text_of(c, "tr[data-listener='web'] td[data-col='name']").await?,
            "web"
        );
        modify(c, "web", "600").await?;
        std::fs::write(shots.join("console-modify.png"), c.screenshot().await?)?;
        c.find(Locator::Id("modify-ok")).await?.click().await?;
        // The dialog closes and the table shows the new duration.
        let mut shown = String::new();
        for _ in 0..100 {
            shown = text_of(c, "tr[data-listener='web'] td[data-col='persist']").await?;
            if shown == "600 s" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::ensure!(shown == "600 s", "the listener shows {shown:?}");
        let open = c
            .find(Locator::Id("modify-dialog"))
            .await?
            .attr("open")
            .await?;
        anyhow::ensure!(open.is_none(), "the dialog is still open");
        Ok(())
    });
    assert_eq!(
        persist(&e.d, "web"),
        600,
        "listener ls after the console change"
    );
    assert!(
        e.d.config_text().contains("persist = 600"),
        "the change is not in the config file:\n{}",
        e.d.config_text()
    );
    // One client's new connections now stick; several clients still spread.
    let vip = SocketAddrV4::new(VIP, 80);
    let mut homes = HashSet::new();
    for ip in &e.topo.extra_clients {
        let seen: HashSet<String> = (0..4)
            .map(|_| ask_once(&e.topo.client, *ip, vip).unwrap())
            .collect();
        assert_eq!(seen.len(), 1, "client {ip} went to {seen:?}");
        homes.extend(seen);
    }
    assert!(homes.len() >= 2, "every client on {homes:?}");
    // The overview after some traffic, for the README.
    std::thread::sleep(Duration::from_secs(6));
    with_browser(&e, &driver, async |c| {
        sign_in(c, &token).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        std::fs::write(shots.join("console-overview.png"), c.screenshot().await?)?;
        Ok(())
    });
}

#[test]
fn console_refuses_4000_and_strangers_in_a_browser() {
    let e = env("cr");
    let driver = Driver::start(&e.topo.lb).unwrap();
    let token = e.token.clone();
    let before = e.d.config_text();
    with_browser(&e, &driver, async |c| {
        sign_in(c, &token).await?;
        modify(c, "web", "4000").await?;
        c.find(Locator::Id("modify-ok")).await?.click().await?;
        let msg = text_of(c, "#modify-error").await?;
        anyhow::ensure!(msg.contains("3600"), "no refusal shown: {msg:?}");
        let open = c
            .find(Locator::Id("modify-dialog"))
            .await?
            .attr("open")
            .await?;
        anyhow::ensure!(open.is_some(), "the dialog closed on a refused value");
        // (The server's own refusal of 4000, with the API's message, is tested over HTTP.)
        Ok(())
    });
    assert_eq!(persist(&e.d, "web"), 0);
    assert_eq!(e.d.config_text(), before);
    // A stranger: the page shows only the sign-in form, and the endpoints refuse changes.
    with_browser(&e, &driver, async |c| {
        c.goto(&format!("http://{CONSOLE}/")).await?;
        c.wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Id("login-token"))
            .await?;
        let hidden = c.find(Locator::Id("console")).await?.attr("hidden").await?;
        anyhow::ensure!(
            hidden.is_some(),
            "the console is visible without signing in"
        );
        let r = c
            .execute_async(
                "const done = arguments[0];
                 Promise.all([
                   fetch('/api/listeners/web', {method: 'PATCH', headers: {'Content-Type':
                     'application/json', 'X-CSRF-Token': 'x'}, body: '{\"persist\":5}'}),
                   fetch('/api/listeners/web/backends', {method: 'POST', headers:
                     {'Content-Type': 'application/json'}, body: '{\"addr\":\"10.0.10.9:80\"}'}),
                   fetch('/api/listeners'),
                 ]).then(rs => done(rs.map(r => r.status)));",
                vec![],
            )
            .await?;
        anyhow::ensure!(
            r == serde_json::json!([401, 401, 401]),
            "a stranger got {r}"
        );
        Ok(())
    });
    assert_eq!(persist(&e.d, "web"), 0);
    assert_eq!(e.d.config_text(), before);
}

/// A small HTTP client in the balancer's namespace (where the console listens).
struct Http<'a> {
    e: &'a Env,
}

impl Http<'_> {
    fn call(
        &self,
        method: &str,
        path: &str,
        cookie: Option<&str>,
        csrf: Option<&str>,
        body: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        self.e.topo.lb.run(|| {
            let c = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut r = c.request(method.parse().unwrap(), format!("http://{CONSOLE}{path}"));
            if let Some(k) = cookie {
                r = r.header("cookie", format!("clb_console={k}"));
            }
            if let Some(t) = csrf {
                r = r.header("x-csrf-token", t);
            }
            if let Some(b) = body {
                r = r
                    .header("content-type", "application/json")
                    .body(b.to_owned());
            }
            let resp = r.send().unwrap();
            let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
            (status, headers, resp.text().unwrap_or_default())
        })
    }

    /// Signs in: (session id, CSRF token).
    fn login(&self) -> (String, String) {
        let body = format!(r#"{{"token":"{}"}}"#, self.e.token);
        let (st, h, text) = self.call("POST", "/api/login", None, None, Some(&body));
        assert_eq!(st, 200, "{text}");
        let set = h["set-cookie"].to_str().unwrap().to_owned();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        let sid = set
            .split(';')
            .next()
            .unwrap()
            .split_once('=')
            .unwrap()
            .1
            .to_owned();
        let csrf: serde_json::Value = serde_json::from_str(&text).unwrap();
        (sid, csrf["csrf"].as_str().unwrap().to_owned())
    }
}

#[test]
fn console_api_refuses_bad_input_and_changes_nothing() {
    let e = env("ch");
    let http = Http { e: &e };
    let mut before = e.d.config_text();
    let unchanged = |what: &str, before: &str| {
        assert_eq!(persist(&e.d, "web"), 0, "{what}");
        assert_eq!(e.d.config_text(), before, "{what}");
    };
    // The page and its headers.
    let (st, h, page) = http.call("GET", "/", None, None, None);
    assert_eq!(st, 200);
    assert!(page.contains("/static/app.js"));
    assert_eq!(h["content-security-policy"], clb::console::CSP);
    assert_eq!(h["x-frame-options"], "DENY");
    let patch = r#"{"persist":600}"#;
    // Not signed in.
    let (st, _, text) = http.call("PATCH", "/api/listeners/web", None, Some("x"), Some(patch));
    assert_eq!(st, 401, "{text}");
    unchanged("unauthenticated PATCH", &before);
    let (sid, csrf) = http.login();
    // Missing and wrong CSRF tokens.
    let (st, _, text) = http.call("PATCH", "/api/listeners/web", Some(&sid), None, Some(patch));
    assert_eq!(st, 403, "{text}");
    assert!(text.contains("X-CSRF-Token"), "{text}");
    let (st, _, text) = http.call(
        "PATCH",
        "/api/listeners/web",
        Some(&sid),
        Some("0123"),
        Some(patch),
    );
    assert_eq!(st, 403, "{text}");
    unchanged("PATCH without a valid CSRF token", &before);
    // Out of range, and an unknown listener: the control plane's messages.
    let (st, _, text) = http.call(
        "PATCH",
        "/api/listeners/web",
        Some(&sid),
        Some(&csrf),
        Some(r#"{"persist":4000}"#),
    );
    assert_eq!(st, 400, "{text}");
    assert!(text.contains("persist 4000 is out of range"), "{text}");
    let (st, _, text) = http.call(
        "PATCH",
        "/api/listeners/nosuch",
        Some(&sid),
        Some(&csrf),
        Some(patch),
    );
    assert_eq!(st, 404, "{text}");
    assert!(text.contains("nosuch"), "{text}");
    unchanged("refused PATCHes", &before);
    // A valid change goes through the control plane and into the file.
    let (st, _, text) = http.call(
        "PATCH",
        "/api/listeners/web",
        Some(&sid),
        Some(&csrf),
        Some(patch),
    );
    assert_eq!(st, 204, "{text}");
    assert_eq!(persist(&e.d, "web"), 600);
    assert!(e.d.config_text().contains("persist = 600"));
    // The audit trail names the console as the source, the refusals with their reason.
    let ev: serde_json::Value = e.d.clb_json(&["status", "--events", "50"]);
    let ev = ev["events"].as_array().expect("events").clone();
    assert!(
        ev.iter().any(|x| x["source"] == "console"
            && x["change"] == "listener web: persist 0 → 600"
            && x.get("refused").is_none()),
        "{ev:#?}"
    );
    assert!(
        ev.iter().any(|x| x["source"] == "console"
            && x["refused"]
                .as_str()
                .is_some_and(|r| r.contains("persist 4000 is out of range"))),
        "{ev:#?}"
    );
    assert!(
        e.d.log().contains("listener web: persist 0 → 600"),
        "no audit line in the daemon's log"
    );
    let (st, _, text) = http.call(
        "PATCH",
        "/api/listeners/web",
        Some(&sid),
        Some(&csrf),
        Some(r#"{"persist":0}"#),
    );
    assert_eq!(st, 204, "{text}");
    // (The file is now in the daemon's canonical form.)
    before = e.d.config_text();
    // Reads: listeners with backend states, pages, series.
    let (st, _, text) = http.call("GET", "/api/listeners", Some(&sid), None, None);
    assert_eq!(st, 200);
    let ls: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(ls[0]["backends"][0]["health"], "healthy", "{ls}");
    let (st, _, text) = http.call("GET", "/api/sessions?limit=5", Some(&sid), None, None);
    assert_eq!(st, 200, "{text}");
    assert!(text.contains("\"total\""), "{text}");
    let (st, _, text) = http.call("GET", "/api/series", Some(&sid), None, None);
    assert_eq!(st, 200, "{text}");
    assert!(text.contains("\"interval_secs\":5"), "{text}");
    // An expired session (idle longer than the daemon's setting).
    std::thread::sleep(Duration::from_secs(IDLE_SECS + 1));
    let (st, _, text) = http.call(
        "PATCH",
        "/api/listeners/web",
        Some(&sid),
        Some(&csrf),
        Some(patch),
    );
    assert_eq!(st, 401, "{text}");
    assert!(text.contains("expired"), "{text}");
    unchanged("PATCH on an expired session", &before);
    // Logout ends a session.
    let (sid, csrf) = http.login();
    let (st, _, _) = http.call("POST", "/api/logout", Some(&sid), Some(&csrf), None);
    assert_eq!(st, 204);
    let (st, _, _) = http.call("GET", "/api/listeners", Some(&sid), None, None);
    assert_eq!(st, 401);
    // Failed sign-ins are limited.
    let mut codes = Vec::new();
    for _ in 0..7 {
        let (st, _, _) = http.call(
            "POST",
            "/api/login",
            None,
            None,
            Some(r#"{"token":"nope"}"#),
        );
        codes.push(st);
    }
    assert_eq!(&codes[..5], &[401; 5], "{codes:?}");
    assert_eq!(codes[5], 429, "{codes:?}");
    // Even the right token waits out the back-off...
    let body = format!(r#"{{"token":"{}"}}"#, e.token);
    let (st, _, text) = http.call("POST", "/api/login", None, None, Some(&body));
    assert_eq!(st, 429, "{text}");
    assert!(text.contains("clb console link"), "{text}");
    // ...but the operator is never locked out: a one-time link from the API socket signs in
    // at once, and only once.
    let link: serde_json::Value = e.d.clb_json(&["console", "link"]);
    let code = link["code"].as_str().unwrap().to_owned();
    assert!(
        link["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/#sign-in={code}")),
        "{link}"
    );
    let with_code = format!(r#"{{"code":"{code}"}}"#);
    let (st, _, text) = http.call("POST", "/api/login", None, None, Some(&with_code));
    assert_eq!(st, 200, "{text}");
    let (st, _, text) = http.call("POST", "/api/login", None, None, Some(&with_code));
    assert_eq!(st, 401, "a code is used up: {text}");
    // The back-off is seconds, not a lockout: the right token goes through once it is over.
    let t0 = Instant::now();
    let st = loop {
        let (st, _, _) = http.call("POST", "/api/login", None, None, Some(&body));
        if st != 429 || t0.elapsed() > Duration::from_secs(10) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(st, 200, "the right token after the back-off");
    unchanged("the end", &before);
}
