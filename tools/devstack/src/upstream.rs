//! The demo upstream (127.0.0.1:8080): a small market-data API answering
//! JSON that also echoes what it received (method, path, the `x-auth-*`
//! headers), so the effect of the filters is visible.

use crate::web::{json, Body};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use serde_json::{json as j, Map, Value};

const TENORS: [&str; 4] = ["DEC26", "MAR27", "JUN27", "DEC27"];

fn echo(req: &Request<Bytes>) -> Value {
    let mut auth = Map::new();
    for (k, v) in req.headers() {
        if k.as_str().starts_with("x-auth-") {
            auth.insert(
                k.as_str().to_string(),
                Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            );
        }
    }
    j!({
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
        "headers": auth,
    })
}

fn price(market: &str, tenor: usize) -> f64 {
    let base: f64 = market.bytes().map(f64::from).sum::<f64>() % 90.0 + 10.0;
    (base + tenor as f64 * 0.75) * 100.0_f64.round() / 100.0
}

pub fn handle(req: &Request<Bytes>) -> Response<Body> {
    let path = req.uri().path();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let body = match segs.as_slice() {
        ["api", "v1", "curves", market, "latest"] => j!({
            "market": market,
            "points": TENORS.iter().enumerate()
                .map(|(i, t)| j!({"tenor": t, "price": price(market, i)}))
                .collect::<Vec<_>>(),
        }),
        ["api", "v1", "curves", market, "history"] => j!({
            "market": market,
            "days": (1..=5).map(|d| j!({"day": -d, "price": price(market, d as usize)})).collect::<Vec<_>>(),
        }),
        ["api", "v1", "instruments", rest @ ..] => j!({
            "instruments": [
                {"id": "EUA-DEC26", "market": "EU-ETS"},
                {"id": "CAISO-SP15-DEC26", "market": "CAISO"}
            ],
            "filter": rest.join("/"),
        }),
        _ => {
            return json(
                StatusCode::NOT_FOUND,
                &j!({"error": "not_found", "echo": echo(req)}),
            )
        }
    };
    let mut body = body;
    body["echo"] = echo(req);
    json(StatusCode::OK, &body)
}
