//! In-band auth and refresh against the sidecar's own verifier (the auth
//! filter's configuration JSON), over real sockets: a connection without
//! identity authenticates with its first frame or is closed 4001; bad
//! tokens of every kind close 4001 with a reason; a refresh keeps the
//! connection, moves its deadline and re-decides its subscriptions, and
//! one for another subject closes 4003. Keys come from a JWKS server on
//! loopback: rotation is picked up at the first token with a new `kid`;
//! with the endpoint down, tokens needing it are refused and the rest are
//! unaffected.

mod common;

#[path = "../../filters/auth/core/tests/common/mod.rs"]
mod keys;

use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const ISS: &str = "https://idp.254carbon.test/realms/carbon";
const OTHER_ISS: &str = "https://dev.254carbon.test";

/// A JWKS endpoint whose document the test changes, and can take down.
struct Jwks {
    addr: SocketAddr,
    doc: Arc<Mutex<Value>>,
    up: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
}

impl Jwks {
    async fn start(doc: Value) -> Jwks {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(doc));
        let up = Arc::new(AtomicBool::new(true));
        let hits = Arc::new(AtomicUsize::new(0));
        let (d, u, h) = (doc.clone(), up.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let (d, u, h) = (d.clone(), u.clone(), h.clone());
                tokio::spawn(async move {
                    let Some(_request) = read_head(&mut s).await else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    let resp = if u.load(Ordering::SeqCst) {
                        let body = d.lock().unwrap().to_string();
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
                    };
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        Jwks {
            addr,
            doc,
            up,
            hits,
        }
    }
}

/// The auth filter's configuration: `kc` fetches its keys from the JWKS
/// server (cluster `idp`), `dev` has an inline HS256 key.
fn auth_config(extra_kc: Value) -> Value {
    let mut kc = json!({
        "issuer": ISS,
        "audiences": ["pricing-api"],
        "jwks": {"remote": {"cluster": "idp", "path": "/jwks", "authority": "idp",
                             "retry_initial_ms": 200, "unknown_kid_refetch_s": 1}},
        "clock_skew_s": 10
    });
    if let (Some(o), Some(e)) = (kc.as_object_mut(), extra_kc.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    json!({
        "providers": {
            "kc": kc,
            "dev": {"issuer": OTHER_ISS, "jwks": {"inline": {"keys": [keys::hs_jwk("hs-1")]}}}
        },
        "rules": [{"match": {"path": {"prefix": "/ws"}}, "requires": {"allow_missing": true}}],
        "jwks_wait_ms": 2000,
        "output": {"roles_claims": ["realm_access.roles"]}
    })
}

struct Stack {
    sc: Sidecar,
    jwks: Jwks,
    _file: TempPath,
}

struct TempPath(std::path::PathBuf);
impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn stack_with(cfg: Value, jwks_doc: Value, args: &[&str]) -> Stack {
    let jwks = Jwks::start(jwks_doc).await;
    let path = std::env::temp_dir().join(format!(
        "sidecar-auth-{}-{:x}.json",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(&path, cfg.to_string()).unwrap();
    let cluster = format!("idp={}", jwks.addr);
    let mut all = vec![
        "--auth-config",
        path.to_str().unwrap(),
        "--cluster",
        &cluster,
        "--ping-interval",
        "100000",
        "--idle-timeout",
        "0",
    ];
    all.extend_from_slice(args);
    let sc = start(&all).await;
    Stack {
        sc,
        jwks,
        _file: TempPath(path),
    }
}

async fn stack() -> Stack {
    stack_with(
        auth_config(json!({})),
        json!({"keys": [keys::ec_jwk("ec-1")]}),
        &[],
    )
    .await
}

fn now(s: &Stack) -> u64 {
    s.sc.app.ctx.clock.now_secs()
}

/// Keycloak-shaped claims for `sub`, valid now for `ttl` seconds.
fn claims(now: u64, sub: &str, markets: &[&str], ttl: u64) -> Value {
    json!({
        "iss": ISS, "aud": ["pricing-api"], "sub": sub, "tenant": "acme",
        "iat": now, "exp": now + ttl,
        "realm_access": {"roles": ["trader"]},
        "entitlements": {"markets": markets}
    })
}

fn es256(kid: &str, c: &Value) -> String {
    keys::token(&json!({"alg": "ES256", "kid": kid}), c)
}

async fn auth(ws: &mut Ws, token: &str) -> Value {
    send(ws, json!({"type": "auth", "id": 1, "token": token})).await;
    recv(ws).await
}

#[tokio::test]
async fn a_connection_without_identity_authenticates_in_band() {
    let s = stack().await;
    let mut ws = connect(s.sc.addr, &[]).await;
    // Nothing but auth and ping before that.
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "s", "channels": ["open.a"]}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["code"].clone(), e["id"].clone()),
        (json!("unauthenticated"), json!("s")),
        "{e}"
    );
    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut ws).await, json!({"type": "pong"}));
    let n = now(&s);
    let t = es256("ec-1", &claims(n, "alice", &["EU-ETS"], 300));
    assert_eq!(
        auth(&mut ws, &t).await,
        json!({"type": "authenticated", "id": 1, "expires": n + 300})
    );
    // The token's claims decide.
    send(
        &mut ws,
        json!({"type": "subscribe", "channels": ["pricing.curves.EU-ETS.>", "pricing.curves.PJM.>"]}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["code"].clone(), e["channel"].clone()),
        (json!("forbidden"), json!("pricing.curves.PJM.>"))
    );
    let sub = recv(&mut ws).await;
    assert_eq!(sub["channels"], json!(["pricing.curves.EU-ETS.>"]), "{sub}");
    publish_ok(s.sc.addr, "pricing.curves.EU-ETS.DEC26", json!(70)).await;
    assert_eq!(recv(&mut ws).await["data"], 70);
    // A second auth is refused; the connection stays.
    let e = auth(&mut ws, &t).await;
    assert_eq!(e["type"], "error", "{e}");
    let text = http(s.sc.addr, "GET", "/metrics", &[], b"").await.1;
    assert!(
        text.lines()
            .any(|l| l == r#"sidecar_ws_auth_total{kind="auth",result="accepted"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn no_auth_within_the_deadline_closes_4001() {
    let s = stack_with(
        auth_config(json!({})),
        json!({"keys": [keys::ec_jwk("ec-1")]}),
        &["--auth-timeout", "1"],
    )
    .await;
    let started = Instant::now();
    let mut ws = connect(s.sc.addr, &[]).await;
    assert_eq!(
        closed(&mut ws).await,
        (4001, "authentication timeout".into())
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn every_kind_of_bad_token_closes_4001_with_a_reason() {
    let s = stack().await;
    let n = now(&s);
    let good = claims(n, "alice", &["EU-ETS"], 300);
    let mut expired = good.clone();
    expired["exp"] = json!(n - 60);
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("other-api");
    // Signed by a key the provider does not have, under a kid it does.
    let foreign = {
        use p256::ecdsa::signature::Signer;
        let other = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
        let input = format!(
            "{}.{}",
            keys::b64(
                json!({"alg": "ES256", "kid": "ec-1"})
                    .to_string()
                    .as_bytes()
            ),
            keys::b64(good.to_string().as_bytes())
        );
        let sig: p256::ecdsa::Signature = other.sign(input.as_bytes());
        format!("{input}.{}", keys::b64(&sig.to_bytes()))
    };
    let none = keys::token(&json!({"alg": "none"}), &good);
    for (token, reason) in [
        ("garbage".to_string(), "invalid token: malformed"),
        (es256("ec-1", &expired), "token expired"),
        (
            es256("ec-1", &wrong_aud),
            "invalid token: audience not accepted",
        ),
        (foreign, "invalid token: bad signature"),
        (none, "invalid token: algorithm not accepted"),
        ("a".repeat(9000), "invalid token: too large"),
    ] {
        let mut ws = connect(s.sc.addr, &[]).await;
        send(&mut ws, json!({"type": "auth", "token": token})).await;
        assert_eq!(
            closed(&mut ws).await,
            (4001, reason.to_string()),
            "{}",
            &token[..token.len().min(40)]
        );
    }
    // Malformed auth frames are refused as messages, not closes.
    let mut ws = connect(s.sc.addr, &[]).await;
    send(&mut ws, json!({"type": "auth"})).await;
    assert_eq!(recv(&mut ws).await["code"], "bad_request");
    send(&mut ws, json!({"type": "auth", "token": 7})).await;
    assert_eq!(recv(&mut ws).await["code"], "bad_request");
    let text = http(s.sc.addr, "GET", "/metrics", &[], b"").await.1;
    for code in [
        "malformed",
        "expired",
        "audience",
        "bad_signature",
        "algorithm",
        "too_large",
    ] {
        let line = format!(r#"sidecar_ws_auth_total{{kind="auth",result="{code}"}} 1"#);
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

#[tokio::test]
async fn a_refresh_keeps_the_connection_moves_the_deadline_and_redecides() {
    let s = stack_with(
        auth_config(json!({"clock_skew_s": 1})),
        json!({"keys": [keys::ec_jwk("ec-1")]}),
        &["--expiry-warning", "1"],
    )
    .await;
    let n = now(&s);
    let mut ws = connect(s.sc.addr, &[]).await;
    // Expires in 3 s (+ 1 s skew): the warning would come at 3 s, the close at 4 s.
    let a = auth(
        &mut ws,
        &es256("ec-1", &claims(n, "alice", &["EU-ETS", "CAISO"], 3)),
    )
    .await;
    assert_eq!(a["type"], "authenticated", "{a}");
    send(
        &mut ws,
        json!({"type": "subscribe", "channels": ["pricing.curves.EU-ETS.>", "pricing.curves.CAISO.>", "open.a"]}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    // A new token for an hour, without CAISO: that subscription alone ends.
    send(
        &mut ws,
        json!({"type": "refresh", "id": "r", "token": es256("ec-1", &claims(n, "alice", &["EU-ETS"], 3600))}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "refreshed", "id": "r", "expires": n + 3600})
    );
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "unsubscribed", "channels": ["pricing.curves.CAISO.>"], "reason": "revoked", "rule": "default"})
    );
    publish_ok(s.sc.addr, "pricing.curves.CAISO.DEC26", json!(1)).await;
    publish_ok(s.sc.addr, "pricing.curves.EU-ETS.DEC26", json!(2)).await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["channel"].clone(), m["data"].clone()),
        (json!("pricing.curves.EU-ETS.DEC26"), json!(2))
    );
    // The old deadline is gone: past it the connection still answers,
    // and no warning was sent.
    tokio::time::sleep_until(s.sc.app.ctx.clock.instant_at(n + 5)).await;
    send(&mut ws, json!({"type": "ping", "id": 9})).await;
    assert_eq!(recv(&mut ws).await, json!({"type": "pong", "id": 9}));
    assert_eq!(s.sc.app.ctx.hub.metrics.expiry_warnings.get(), 0);
    // Another subject: 4003.
    send(
        &mut ws,
        json!({"type": "refresh", "token": es256("ec-1", &claims(n, "mallory", &["EU-ETS"], 3600))}),
    )
    .await;
    assert_eq!(closed(&mut ws).await, (4003, "identity changed".into()));
}

#[tokio::test]
async fn a_refresh_for_a_header_identity_needs_the_same_subject() {
    let s = stack().await;
    let n = now(&s);
    // Arrived with identity headers (the token at the upgrade).
    let mut h = identity("alice", "trader", &["EU-ETS"]);
    for (k, v) in h.iter_mut() {
        if k == "x-auth-issuer" {
            *v = ISS.into();
        }
    }
    h.push(("x-auth-expires".into(), (n + 30).to_string()));
    let mut ws = connect(s.sc.addr, &h).await;
    send(
        &mut ws,
        json!({"type": "refresh", "token": es256("ec-1", &claims(n, "alice", &["EU-ETS"], 600))}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "refreshed", "expires": n + 600})
    );
}

#[tokio::test]
async fn rotation_is_picked_up_at_the_first_token_with_a_new_kid() {
    let s = stack().await;
    let n = now(&s);
    let mut ws = connect(s.sc.addr, &[]).await;
    assert_eq!(
        auth(&mut ws, &es256("ec-1", &claims(n, "alice", &[], 300))).await["type"],
        "authenticated"
    );
    let before = s.jwks.hits.load(Ordering::SeqCst);
    // The provider rotates: the same EC key now under kid ec-2.
    *s.jwks.doc.lock().unwrap() = json!({"keys": [keys::ec_jwk("ec-2")]});
    // Within the refetch window of the first fetch the kid is just unknown;
    // after it, the first token with the new kid makes one fetch.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut ws2 = connect(s.sc.addr, &[]).await;
    assert_eq!(
        auth(&mut ws2, &es256("ec-2", &claims(n, "bob", &[], 300))).await["type"],
        "authenticated"
    );
    assert_eq!(s.jwks.hits.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn with_the_endpoint_down_only_tokens_needing_it_are_refused() {
    let s = stack().await;
    s.jwks.up.store(false, Ordering::SeqCst);
    // A fresh verifier has no keys yet; but the first fetch may have
    // happened: make sure the kid is one it never saw.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let n = now(&s);
    let mut ws = connect(s.sc.addr, &[]).await;
    send(
        &mut ws,
        json!({"type": "auth", "token": es256("ec-9", &claims(n, "alice", &[], 300))}),
    )
    .await;
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, 4001);
    assert!(
        reason == "invalid token: unknown key" || reason == "invalid token: keys unavailable",
        "{reason}"
    );
    // The inline provider does not need the endpoint.
    let hs = keys::token(
        &json!({"alg": "HS256", "kid": "hs-1"}),
        &json!({"iss": OTHER_ISS, "sub": "dev", "exp": n + 300}),
    );
    let mut ws = connect(s.sc.addr, &[]).await;
    assert_eq!(auth(&mut ws, &hs).await["type"], "authenticated");
}

#[tokio::test]
async fn a_provider_never_reached_refuses_after_the_wait() {
    // Nothing listens on the cluster's address.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cfg = auth_config(json!({}));
    let path = std::env::temp_dir().join(format!("sidecar-auth-dead-{}.json", std::process::id()));
    std::fs::write(&path, cfg.to_string()).unwrap();
    let _p = TempPath(path.clone());
    let cluster = format!("idp={dead}");
    let sc = start(&[
        "--auth-config",
        path.to_str().unwrap(),
        "--cluster",
        &cluster,
    ])
    .await;
    let n = sc.app.ctx.clock.now_secs();
    let mut ws = connect(sc.addr, &[]).await;
    let started = Instant::now();
    send(
        &mut ws,
        json!({"type": "auth", "token": es256("ec-1", &claims(n, "alice", &[], 300))}),
    )
    .await;
    assert_eq!(
        closed(&mut ws).await,
        (4001, "invalid token: keys unavailable".into())
    );
    // Refused once the fetch it waited for failed, within jwks_wait_ms.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
}

/// A stack whose identity headers need their token (`--identity-proof token`).
async fn proving() -> Stack {
    stack_with(
        auth_config(json!({})),
        json!({"keys": [keys::ec_jwk("ec-1")]}),
        &["--identity-proof", "token"],
    )
    .await
}

/// The identity headers the gateway's auth filter sets for `token` (the
/// same code: `auth_core::authenticate`), and the token it forwards.
async fn gateway_headers(s: &Stack, token: &str) -> Vec<(String, String)> {
    let v =
        s.sc.app
            .ctx
            .verifier
            .as_ref()
            .unwrap()
            .verify(token)
            .await
            .unwrap();
    let mut h = v.headers.clone();
    h.push(("authorization".into(), format!("Bearer {token}")));
    h
}

async fn proofs(s: &Stack) -> String {
    let (_, m) = http(s.sc.addr, "GET", "/metrics", &[], b"").await;
    m.lines()
        .filter(|l| l.starts_with("sidecar_identity_proofs_total{"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn identity_headers_need_the_token_they_came_from() {
    let s = proving().await;
    let n = now(&s);
    // Made up, straight to the sidecar: refused.
    let forged = identity("mallory", "trader", &["EU-ETS", "CAISO", "PJM"]);
    let (status, body) = try_connect(s.sc.addr, &forged).await.err().unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "identity_unproven"
    );

    // What the gateway sends: the headers and the token they came from.
    let alice = es256("ec-1", &claims(n, "alice", &["EU-ETS"], 300));
    let mut ws = try_connect(s.sc.addr, &gateway_headers(&s, &alice).await)
        .await
        .unwrap();
    send(
        &mut ws,
        json!({"type": "subscribe", "id": 1, "channels": ["pricing.curves.EU-ETS.DEC26"]}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");

    // Alice's token with Bob's headers: refused.
    let bob = es256("ec-1", &claims(n, "bob", &["EU-ETS", "PJM"], 300));
    let mut mixed: Vec<(String, String)> = gateway_headers(&s, &bob)
        .await
        .into_iter()
        .filter(|(k, _)| k != "authorization")
        .collect();
    mixed.push(("authorization".into(), format!("Bearer {alice}")));
    let (status, body) = try_connect(s.sc.addr, &mixed).await.err().unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "identity_mismatch"
    );
    // One header changed is enough.
    let mut one = gateway_headers(&s, &alice).await;
    for (k, v) in &mut one {
        if k == "x-auth-tenant" {
            *v = "beta".into();
        }
    }
    assert_eq!(try_connect(s.sc.addr, &one).await.err().unwrap().0, 401);

    // An expired token proves nothing.
    let old = es256("ec-1", &claims(n - 1000, "alice", &["EU-ETS"], 300));
    let mut stale = gateway_headers(&s, &alice).await;
    stale.retain(|(k, _)| k != "authorization");
    stale.push(("authorization".into(), format!("Bearer {old}")));
    let (status, body) = try_connect(s.sc.addr, &stale).await.err().unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "invalid_token"
    );

    // The token alone stands for the headers.
    let only = [("authorization".to_string(), format!("Bearer {alice}"))];
    let mut ws2 = try_connect(s.sc.addr, &only).await.unwrap();
    send(
        &mut ws2,
        json!({"type": "subscribe", "id": 2, "channels": ["pricing.curves.PJM.>"]}),
    )
    .await;
    assert_eq!(
        recv(&mut ws2).await["code"],
        "forbidden",
        "alice's markets, not PJM"
    );

    let m = proofs(&s).await;
    for want in [
        r#"sidecar_identity_proofs_total{endpoint="ws",result="missing"} 1"#,
        r#"sidecar_identity_proofs_total{endpoint="ws",result="mismatch"} 2"#,
        r#"sidecar_identity_proofs_total{endpoint="ws",result="expired"} 1"#,
        r#"sidecar_identity_proofs_total{endpoint="ws",result="verified"} 2"#,
    ] {
        assert!(m.contains(want), "{want} not in\n{m}");
    }
    // Publishing is held to the same proof.
    let (status, _) = http(
        s.sc.addr,
        "POST",
        "/publish/open.a",
        &identity("mallory", "publisher", &[]),
        b"1",
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn rotated_keys_serve_new_connections_and_drop_none() {
    let s = proving().await;
    let n = now(&s);
    let t1 = es256("ec-1", &claims(n, "alice", &["EU-ETS"], 300));
    let mut old = try_connect(s.sc.addr, &gateway_headers(&s, &t1).await)
        .await
        .unwrap();
    send(
        &mut old,
        json!({"type": "subscribe", "id": 1, "channels": ["pricing.curves.EU-ETS.DEC26"]}),
    )
    .await;
    assert_eq!(recv(&mut old).await["type"], "subscribed");
    // The identity provider rotates: a new key, the old one gone.
    *s.jwks.doc.lock().unwrap() = json!({"keys": [keys::ec_jwk("ec-2")]});
    let t2 = es256("ec-2", &claims(n, "bob", &["EU-ETS"], 300));
    // The gateway would have fetched the new set: the token's own headers.
    let mut h = keys_headers(&t2);
    h.push(("authorization".into(), format!("Bearer {t2}")));
    // An unknown kid refetches the set, at most once a second here
    // (`unknown_kid_refetch_s`); the set fetched at start is that recent.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut new = loop {
        match try_connect(s.sc.addr, &h).await {
            Ok(ws) => break ws,
            Err(e) => assert!(Instant::now() < deadline, "still refused after 5 s: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    send(&mut new, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut new).await, json!({"type": "pong"}));
    // The connection proven with the old key stays.
    send(&mut old, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut old).await, json!({"type": "pong"}));
    assert!(
        s.jwks.hits.load(Ordering::SeqCst) >= 2,
        "the new key set was fetched"
    );
}

/// The identity headers the auth filter sets for an ES256 token of
/// [`claims`], computed as it does (subject, issuer, tenant, roles, the
/// payload as received, `exp`).
fn keys_headers(token: &str) -> Vec<(String, String)> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let c: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    vec![
        ("x-auth-subject".into(), c["sub"].as_str().unwrap().into()),
        ("x-auth-issuer".into(), c["iss"].as_str().unwrap().into()),
        ("x-auth-tenant".into(), c["tenant"].as_str().unwrap().into()),
        ("x-auth-roles".into(), "trader".into()),
        ("x-auth-claims".into(), payload.into()),
        ("x-auth-expires".into(), c["exp"].to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_takes_an_admin_role_only_with_its_token() {
    let db = tokio::task::spawn_blocking(|| common::pg::Schema::new("proof_admin"))
        .await
        .unwrap();
    let conninfo = db.conninfo();
    let s = stack_with(
        auth_config(json!({})),
        json!({"keys": [keys::ec_jwk("ec-1")]}),
        &["--identity-proof", "token", "--grants-postgres", &conninfo],
    )
    .await;
    let g = json!({"tenant": "acme", "resource": "curves:CAISO", "action": "read"}).to_string();
    // Forged: the role in a header, no token.
    let forged = identity("mallory", "access-admin", &[]);
    let (status, body) = http(s.sc.addr, "PUT", "/admin/v1/grants", &forged, g.as_bytes()).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("identity_unproven"), "{body}");
    // The gateway's headers with the token they came from.
    let n = now(&s);
    let mut c = claims(n, "sales-1", &[], 300);
    c["realm_access"]["roles"] = json!(["access-admin"]);
    let t = es256("ec-1", &c);
    let (status, body) = http(
        s.sc.addr,
        "PUT",
        "/admin/v1/grants",
        &gateway_headers(&s, &t).await,
        g.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A trader's token with the admin role written into its headers.
    let trader = es256("ec-1", &claims(n, "tom", &[], 300));
    let mut h = gateway_headers(&s, &trader).await;
    for (k, v) in &mut h {
        if k == "x-auth-roles" {
            *v = "access-admin".into();
        }
    }
    let (status, body) = http(s.sc.addr, "PUT", "/admin/v1/grants", &h, g.as_bytes()).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("identity_mismatch"), "{body}");
    drop(s);
    tokio::task::spawn_blocking(move || drop(db)).await.unwrap();
}
