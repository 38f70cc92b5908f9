//! Streams that stay entitled, over real sockets: an identity's end
//! (the token's `exp` plus skew, or the longest lifetime) closes the
//! connection after one `expiring`, on tokio's paused clock; a new policy
//! (the file rewritten, SIGHUP, a refused file) revokes exactly the
//! subscriptions it no longer allows, and nothing of them arrives after
//! their `unsubscribed`.

mod common;

use common::*;
use serde_json::{json, Value};
use sidecar::reload::{FileSource, Outcome};
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

/// No pings or idle closes in the way of a paused clock.
const QUIET: [&str; 4] = ["--ping-interval", "100000", "--idle-timeout", "0"];

fn with_expiry(mut h: Vec<(String, String)>, exp: u64) -> Vec<(String, String)> {
    h.push(("x-auth-expires".into(), exp.to_string()));
    h
}

#[tokio::test(start_paused = true)]
async fn expiry_closes_at_exp_plus_skew_after_one_warning() {
    let mut args = QUIET.to_vec();
    args.extend(["--clock-skew", "60", "--expiry-warning", "30"]);
    let sc = start(&args).await;
    let clock = sc.app.ctx.clock;
    let exp = clock.now_secs() + 100;
    let mut ws = connect(
        sc.addr,
        &with_expiry(identity("alice", "trader", &["EU-ETS"]), exp),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "subscribe", "channels": ["open.a"]}),
    )
    .await;
    assert_eq!(recv_any(&mut ws).await["type"], "subscribed");
    publish_ok(sc.addr, "open.a", json!(1)).await;
    assert_eq!(recv_any(&mut ws).await["data"], 1);
    // The warning comes exactly `expiry_warning` before exp + skew.
    let warning = recv_any(&mut ws).await;
    assert_eq!(warning, json!({"type": "expiring", "in": 30}));
    assert_eq!(Instant::now(), clock.instant_at(exp + 60 - 30));
    // Still delivering until the end.
    publish_ok(sc.addr, "open.a", json!(2)).await;
    assert_eq!(recv_any(&mut ws).await["data"], 2);
    let (code, reason) = closed_any(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    assert_eq!(Instant::now(), clock.instant_at(exp + 60));
    let m = &sc.app.ctx.hub.metrics;
    assert_eq!(m.expiry_warnings.get(), 1, "exactly one warning");
    assert_eq!(m.closes.expired.get(), 1);
    eventually("the expired connection's subscription removed", || {
        m.subscriptions.get() == 0
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_identity_with_little_time_left_is_warned_at_once_and_a_past_one_closed() {
    let mut args = QUIET.to_vec();
    args.extend(["--clock-skew", "5", "--expiry-warning", "30"]);
    let sc = start(&args).await;
    let clock = sc.app.ctx.clock;
    let now = clock.now_secs();
    let mut ws = connect(
        sc.addr,
        &with_expiry(identity("alice", "trader", &[]), now + 5),
    )
    .await;
    // 10 s left minus the part of the current second already gone,
    // rounded up: "in 10" (9 if the second turned meanwhile).
    let started = Instant::now();
    let v = recv_any(&mut ws).await;
    let left = clock.instant_at(now + 10) - Instant::now();
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    assert_eq!(v, json!({"type": "expiring", "in": secs}));
    assert!(secs == 10 || secs == 9, "{secs}");
    assert!(Instant::now() - started < Duration::from_secs(1), "at once");
    let (code, _) = closed_any(&mut ws).await;
    assert_eq!(code, 4001);
    assert_eq!(Instant::now(), clock.instant_at(now + 10));
    // Already past exp + skew: closed without a warning.
    let mut ws = connect(
        sc.addr,
        &with_expiry(identity("alice", "trader", &[]), now - 100),
    )
    .await;
    assert_eq!(
        closed_any(&mut ws).await,
        (4001, "token expired".to_string())
    );
    assert_eq!(sc.app.ctx.hub.metrics.closes.expired.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_identity_without_expiry_lives_at_most_max_lifetime() {
    let mut args = QUIET.to_vec();
    args.extend(["--max-lifetime", "3600", "--expiry-warning", "30"]);
    let sc = start(&args).await;
    let started = Instant::now();
    let mut ws = connect(sc.addr, &identity("alice", "trader", &[])).await;
    assert_eq!(
        recv_any(&mut ws).await,
        json!({"type": "expiring", "in": 30})
    );
    assert_eq!(
        closed_any(&mut ws).await,
        (4001, "lifetime exceeded".to_string())
    );
    // Whole seconds from the moment of the upgrade.
    let lived = Instant::now() - started;
    assert!(
        lived <= Duration::from_secs(3600) && lived > Duration::from_secs(3599),
        "{lived:?}"
    );
    assert_eq!(sc.app.ctx.hub.metrics.closes.lifetime.get(), 1);
}

#[tokio::test]
async fn a_malformed_expiry_header_is_refused() {
    let sc = start(&[]).await;
    let h = {
        let mut h = identity("alice", "trader", &[]);
        h.push(("x-auth-expires".into(), "soon".into()));
        h.push(("upgrade".into(), "websocket".into()));
        h.push(("connection".into(), "upgrade".into()));
        h.push(("sec-websocket-version".into(), "13".into()));
        h.push((
            "sec-websocket-key".into(),
            "dGhlIHNhbXBsZSBub25jZQ==".into(),
        ));
        h
    };
    let (status, body) = http(sc.addr, "GET", "/ws", &h, b"").await;
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "invalid_identity");
    assert!(
        v["message"].as_str().unwrap().contains("x-auth-expires"),
        "{v}"
    );
}

// ---- live policy ----

/// A policy where EU-ETS curves need the market claim, and `open.x.>` is
/// open unless `close_x`.
fn policy(close_x: bool, markets_rule: bool) -> String {
    let mut rules = vec![];
    if markets_rule {
        rules.push(json!({"id": "curves", "effect": "allow",
            "match": {"channel": "pricing.curves.{market}.>"},
            "when": [{"attr": "claims.entitlements.markets", "op": "contains", "capture": "market"}]}));
    }
    if close_x {
        rules.push(json!({"id": "x-closed", "effect": "deny", "match": {"channel": "open.x.>"}}));
    }
    rules.push(json!({"id": "open", "effect": "allow", "match": {"channel": "open.>"}}));
    rules.push(json!({"id": "publishers", "effect": "allow",
        "match": {"channel": ">", "actions": ["publish"]},
        "when": [{"attr": "roles", "op": "contains", "value": "publisher"}]}));
    json!({ "rules": rules }).to_string()
}

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, content: &str) -> TempFile {
        let p = std::env::temp_dir().join(format!(
            "sidecar-test-{}-{name}-{:x}.json",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::write(&p, content).unwrap();
        TempFile(p)
    }
    fn write(&self, content: &str) {
        // Replace atomically, as an editor or a ConfigMap update does.
        let tmp = self.0.with_extension("new");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts a sidecar on `policy_text` (instead of the common test policy).
async fn start_on(policy_text: &str) -> Sidecar {
    let sc = start(&[]).await;
    sc.app
        .ctx
        .set_policy(entitlements_core::policy::Policy::from_json(policy_text.as_bytes()).unwrap());
    sc
}

async fn subscribed(ws: &mut Ws, channels: &[&str]) {
    send(ws, json!({"type": "subscribe", "channels": channels})).await;
    let v = recv(ws).await;
    assert_eq!(v["type"], "subscribed", "{v}");
    assert_eq!(v["channels"], json!(channels), "{v}");
}

#[tokio::test]
async fn a_new_policy_revokes_exactly_what_it_no_longer_allows() {
    let file = TempFile::new("revoke", &policy(false, true));
    let sc = start_on(&policy(false, true)).await;
    let mut src = FileSource::new(&file.0, Some(policy(false, true).into_bytes()));
    assert_eq!(src.check(&sc.app.ctx), Outcome::Unchanged);
    let mut ws = connect(sc.addr, &identity("alice", "trader", &["EU-ETS"])).await;
    subscribed(
        &mut ws,
        &["open.x.>", "open.x.a", "open.y", "pricing.curves.EU-ETS.>"],
    )
    .await;
    // Closing open.x.> revokes the pattern and the channel under it; the
    // rest stays.
    file.write(&policy(true, true));
    assert_eq!(src.check(&sc.app.ctx), Outcome::Applied);
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "unsubscribed", "channels": ["open.x.>", "open.x.a"],
               "reason": "revoked", "rule": "x-closed"})
    );
    publish_ok(sc.addr, "open.x.a", json!(1)).await;
    publish_ok(sc.addr, "open.y", json!(2)).await;
    publish_ok(sc.addr, "pricing.curves.EU-ETS.DEC26", json!(3)).await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["channel"].clone(), m["data"].clone()),
        (json!("open.y"), json!(2))
    );
    let m = recv(&mut ws).await;
    assert_eq!(m["data"], 3, "{m}");
    // A policy without the curves rule: the market subscription goes by
    // the default rule.
    file.write(&policy(true, false));
    assert_eq!(src.check(&sc.app.ctx), Outcome::Applied);
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "unsubscribed", "channels": ["pricing.curves.EU-ETS.>"],
               "reason": "revoked", "rule": "default"})
    );
    // The connection stays and may subscribe to what is allowed.
    subscribed(&mut ws, &["open.z"]).await;
    let metrics = &sc.app.ctx.hub.metrics;
    assert_eq!(metrics.subscriptions.get(), 2, "open.y and open.z");
    let text = http(sc.addr, "GET", "/metrics", &[], b"").await.1;
    for line in [
        r#"sidecar_ws_revoked_subscriptions_total{rule="x-closed"} 2"#,
        r#"sidecar_ws_revoked_subscriptions_total{rule="default"} 1"#,
        r#"sidecar_policy_reloads_total{source="file",result="ok"} 2"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

/// Connections beyond the number of waves (64) a change is handed on in.
const MANY: usize = 130;

#[tokio::test]
async fn a_burst_of_changes_reaches_every_connection_once_with_the_newest() {
    let sc = start_on(&policy(false, false)).await;
    let mut conns = Vec::new();
    for i in 0..MANY {
        let mut ws = connect(sc.addr, &identity(&format!("u{i}"), "trader", &[])).await;
        subscribed(&mut ws, &["open.x.a", "open.y.b"]).await;
        conns.push(ws);
    }
    // Two changes back to back: the first (closing open.x.>) is overtaken
    // before any connection is handed it.
    let shut = json!({"rules": [
        {"id": "shut", "effect": "deny", "match": {"channel": "open.>"}},
        {"id": "publishers", "effect": "allow", "match": {"channel": ">", "actions": ["publish"]},
         "when": [{"attr": "roles", "op": "contains", "value": "publisher"}]}]});
    let compile = |t: &str| entitlements_core::policy::Policy::from_json(t.as_bytes()).unwrap();
    sc.app.ctx.set_policy(compile(&policy(true, false)));
    sc.app.ctx.set_policy(compile(&shut.to_string()));
    for (i, ws) in conns.iter_mut().enumerate() {
        assert_eq!(
            recv(ws).await,
            json!({"type": "unsubscribed", "channels": ["open.x.a", "open.y.b"],
                   "reason": "revoked", "rule": "shut"}),
            "connection {i}"
        );
        // Nothing else came before the answer to a ping.
        send(ws, json!({"type": "ping"})).await;
        assert_eq!(recv(ws).await, json!({"type": "pong"}), "connection {i}");
    }
    let text = http(sc.addr, "GET", "/metrics", &[], b"").await.1;
    let line = format!(
        r#"sidecar_ws_revoked_subscriptions_total{{rule="shut"}} {}"#,
        2 * MANY
    );
    assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    assert!(
        !text.contains(r#"rule="x-closed""#),
        "the overtaken policy decided nothing:\n{text}"
    );
    assert_eq!(sc.app.ctx.hub.metrics.subscriptions.get(), 0);
}

#[tokio::test]
async fn a_refused_policy_keeps_the_last_good_one() {
    let file = TempFile::new("refused", &policy(false, true));
    let sc = start_on(&policy(false, true)).await;
    let mut src = FileSource::new(&file.0, Some(policy(false, true).into_bytes()));
    let mut ws = connect(sc.addr, &identity("alice", "trader", &["EU-ETS"])).await;
    subscribed(&mut ws, &["open.x.a"]).await;
    file.write(r#"{"rules": [{"id": "broken", "effect": "perhaps"}]}"#);
    assert!(matches!(src.check(&sc.app.ctx), Outcome::Refused(_)));
    // Reported once, not at every look.
    assert_eq!(src.check(&sc.app.ctx), Outcome::Unchanged);
    std::fs::remove_file(&file.0).unwrap();
    assert!(matches!(src.check(&sc.app.ctx), Outcome::Refused(_)));
    publish_ok(sc.addr, "open.x.a", json!(1)).await;
    assert_eq!(recv(&mut ws).await["data"], 1, "still subscribed");
    let text = http(sc.addr, "GET", "/metrics", &[], b"").await.1;
    assert!(
        text.lines()
            .any(|l| l == r#"sidecar_policy_reloads_total{source="file",result="refused"} 2"#),
        "{text}"
    );
    // The file back, changed: in force.
    file.write(&policy(true, true));
    assert_eq!(src.check(&sc.app.ctx), Outcome::Applied);
    assert_eq!(recv(&mut ws).await["type"], "unsubscribed");
}

#[tokio::test]
async fn a_rewritten_file_and_sighup_are_picked_up() {
    let file = TempFile::new("watch", &policy(false, true));
    let sc = start_on(&policy(false, true)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    // Polling only.
    tokio::spawn(sidecar::reload::watch_file(
        FileSource::new(&file.0, Some(policy(false, true).into_bytes())),
        sc.app.ctx.clone(),
        Duration::from_millis(50),
        stop.clone(),
    ));
    let mut ws = connect(sc.addr, &identity("alice", "trader", &["EU-ETS"])).await;
    subscribed(&mut ws, &["open.x.a"]).await;
    file.write(&policy(true, true));
    let v = tokio::time::timeout(Duration::from_secs(10), recv_any(&mut ws))
        .await
        .expect("the rewritten file picked up by polling within 10 s");
    assert_eq!(v["reason"], "revoked", "{v}");
    stop.cancel();

    // SIGHUP only (no polling).
    let file = TempFile::new("hup", &policy(false, true));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sidecar::reload::watch_file(
        FileSource::new(&file.0, Some(policy(false, true).into_bytes())),
        sc.app.ctx.clone(),
        Duration::ZERO,
        stop.clone(),
    ));
    // Back to an open policy through the context, then subscribe again.
    sc.app.ctx.set_policy(
        entitlements_core::policy::Policy::from_json(policy(false, true).as_bytes()).unwrap(),
    );
    subscribed(&mut ws, &["open.x.b"]).await;
    file.write(&policy(true, true));
    // The watcher's handler is installed once its task has run.
    tokio::task::yield_now().await;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let v = tokio::time::timeout(Duration::from_secs(10), recv_any(&mut ws))
        .await
        .expect("SIGHUP reloads the file within 10 s");
    assert_eq!(
        v,
        json!({"type": "unsubscribed", "channels": ["open.x.b"], "reason": "revoked", "rule": "x-closed"})
    );
    stop.cancel();
}

#[tokio::test]
async fn nothing_of_a_revoked_channel_arrives_after_its_unsubscribed() {
    let sc = start_on(&policy(false, true)).await;
    let mut ws = connect(sc.addr, &identity("alice", "trader", &["EU-ETS"])).await;
    subscribed(&mut ws, &["open.x.a", "open.y"]).await;
    let hub = sc.app.ctx.hub.clone();
    // A publisher that never stops while the policy changes under it.
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (x, y) = (
                entitlements_core::channel::Subject::parse("open.x.a").unwrap(),
                entitlements_core::channel::Subject::parse("open.y").unwrap(),
            );
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                hub.publish(&x, n.to_string().into()).unwrap();
                hub.publish(&y, n.to_string().into()).unwrap();
                tokio::task::yield_now().await;
            }
            n
        })
    };
    // Some traffic first.
    let mut seen_x = 0;
    while seen_x < 20 {
        if recv(&mut ws).await["channel"] == "open.x.a" {
            seen_x += 1;
        }
    }
    sc.app.ctx.set_policy(
        entitlements_core::policy::Policy::from_json(policy(true, true).as_bytes()).unwrap(),
    );
    // Until the frame: anything. After it: open.y only, for a good while.
    loop {
        let v = recv(&mut ws).await;
        if v["type"] == "unsubscribed" {
            assert_eq!(v["channels"], json!(["open.x.a"]), "{v}");
            break;
        }
    }
    let mut after = 0;
    while after < 200 {
        let v = recv(&mut ws).await;
        assert_eq!(v["channel"], "open.y", "after unsubscribed: {v}");
        after += 1;
    }
    stop.cancel();
    let published = publisher.await.unwrap();
    assert!(published > 200);
}

/// A policy endpoint: serves `doc` with its ETag, 304 when the client
/// already has it; records the `If-None-Match` values it saw.
struct PolicyServer {
    addr: std::net::SocketAddr,
    doc: std::sync::Arc<std::sync::Mutex<(String, String)>>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl PolicyServer {
    async fn start(doc: &str, etag: &str) -> PolicyServer {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let doc = std::sync::Arc::new(std::sync::Mutex::new((doc.to_string(), etag.to_string())));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (d, sn) = (doc.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let (d, sn) = (d.clone(), sn.clone());
                tokio::spawn(async move {
                    let Some(req) = read_head(&mut s).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&req).to_ascii_lowercase();
                    let inm = head
                        .lines()
                        .find_map(|l| l.strip_prefix("if-none-match: "))
                        .map(|v| v.trim().to_string());
                    sn.lock().unwrap().push(inm.clone());
                    let (body, etag) = d.lock().unwrap().clone();
                    let resp = if inm.as_deref() == Some(etag.as_str()) {
                        format!("HTTP/1.1 304 Not Modified\r\netag: {etag}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\netag: {etag}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        PolicyServer { addr, doc, seen }
    }

    fn set(&self, doc: &str, etag: &str) {
        *self.doc.lock().unwrap() = (doc.to_string(), etag.to_string());
    }
}

#[tokio::test]
async fn a_remote_policy_is_fetched_with_its_etag_and_a_refused_one_keeps_the_last_good() {
    let server = PolicyServer::start(&policy(false, true), "\"a\"").await;
    let sc = start_on(&policy(true, true)).await;
    let mut r =
        sidecar::reload::Remote::parse(&format!("http://{}/v1/policy", server.addr)).unwrap();
    r.refresh = Duration::from_millis(100);
    r.retry = Duration::from_millis(100);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sidecar::reload::watch_remote(
        r,
        sc.app.ctx.clone(),
        stop.clone(),
    ));
    let m = sc.app.ctx.hub.metrics.clone();
    let ok = |m: &sidecar::metrics::Metrics, result: &str| {
        m.policy_reloads
            .get_or_create(&vec![
                ("source".to_string(), "remote".to_string()),
                ("result".to_string(), result.to_string()),
            ])
            .get()
    };
    // The first fetch replaces the local policy (which closed open.x).
    eventually("the first remote policy in force", || ok(&m, "ok") == 1).await;
    let mut ws = connect(sc.addr, &identity("alice", "trader", &["EU-ETS"])).await;
    subscribed(&mut ws, &["open.x.a"]).await;
    // Unchanged: conditional fetches answered 304, nothing re-decided.
    eventually("a conditional fetch", || {
        server
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.as_deref() == Some("\"a\""))
    })
    .await;
    assert_eq!(ok(&m, "ok"), 1);
    // A new version revokes what it closes.
    server.set(&policy(true, true), "\"b\"");
    let v = tokio::time::timeout(Duration::from_secs(10), recv_any(&mut ws))
        .await
        .expect("the new remote policy within 10 s");
    assert_eq!(
        v,
        json!({"type": "unsubscribed", "channels": ["open.x.a"], "reason": "revoked", "rule": "x-closed"})
    );
    // An invalid one is refused; the last good stays.
    server.set(r#"{"rules": "nope"}"#, "\"c\"");
    eventually("the invalid remote policy refused", || {
        ok(&m, "refused") >= 1
    })
    .await;
    subscribed(&mut ws, &["open.y"]).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "channels": ["open.x.b"]}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["code"].clone(), e["channel"].clone()),
        (json!("forbidden"), json!("open.x.b")),
        "{e}"
    );
    stop.cancel();
}
