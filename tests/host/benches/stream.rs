//! Cost of one HTTP request stream in the emulator: request headers, a
//! 200 response with headers, then on_log/on_done/on_delete.
//!
//! Rows: the empty chain (the host's own stream machinery, no guest), one
//! no-op filter, and three no-op filters. Each row is sampled repeatedly;
//! the table gives min / median / max µs per stream over the samples, and the
//! ratios are taken within the same run. Also written as JSON to
//! `target/bench/host-stream.json`.
//!
//! `cargo bench -p wasm-host --bench stream [-- --quick]`

use std::time::Instant;
use wasm_host::{Chain, Host, PluginConfig};

const REQUEST: &[(&str, &str)] = &[
    (":method", "GET"),
    (
        ":path",
        "/api/v1/curves/EU-ETS/DEC26?at=2026-11-26T00:00:00Z",
    ),
    (":authority", "api.254carbon.test"),
    (":scheme", "https"),
    ("user-agent", "bench/1.0"),
    ("accept", "application/json"),
    ("authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"),
    ("x-request-id", "0f9b6c1e-5d0a-4c83-9d0e-6a1c2b3d4e5f"),
];
const RESPONSE: &[(&str, &str)] = &[
    ("content-type", "application/json"),
    ("cache-control", "no-store"),
];

fn one_stream(host: &Host, chain: &Chain) {
    let s = host.stream(chain);
    s.request_headers(REQUEST, true);
    s.respond(200, RESPONSE, b"");
    debug_assert!(s.is_complete());
}

struct Row {
    name: &'static str,
    samples_us: Vec<f64>,
}

impl Row {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.samples_us.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    fn min(&self) -> f64 {
        self.sorted()[0]
    }
    fn max(&self) -> f64 {
        *self.sorted().last().unwrap_or(&0.0)
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (samples, per_sample) = if quick { (10, 500) } else { (30, 2000) };

    let host = Host::builder().workers(2).build();
    let noop = |name: &str| {
        host.load(PluginConfig::new(wasm_host::wasm_path("noop")).name(name))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (a, b, c) = (noop("noop-a"), noop("noop-b"), noop("noop-c"));
    let chains: Vec<(&'static str, Chain)> = vec![
        ("empty chain (host only)", host.chain(&[])),
        ("1 no-op filter", host.chain(&[&a])),
        ("3 no-op filters", host.chain(&[&a, &b, &c])),
    ];

    let mut rows: Vec<Row> = chains
        .iter()
        .map(|(n, _)| Row {
            name: n,
            samples_us: Vec::new(),
        })
        .collect();
    // Warm up every chain, then interleave the rows sample by sample so that
    // machine noise falls on all of them alike.
    for (_, chain) in &chains {
        for _ in 0..per_sample {
            one_stream(&host, chain);
        }
    }
    for _ in 0..samples {
        for (row, (_, chain)) in rows.iter_mut().zip(&chains) {
            let t = Instant::now();
            for _ in 0..per_sample {
                one_stream(&host, chain);
            }
            let per = t.elapsed().as_secs_f64() * 1e6 / per_sample as f64;
            row.samples_us.push(per);
        }
    }

    let base = rows[0].median();
    let one = rows[1].median();
    println!("\n### One request stream through the emulator ({samples} samples × {per_sample} streams, 2 worker VMs)\n");
    println!("| chain | min µs | median µs | max µs | median / empty chain | median / 1 no-op |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2}× | {:.2}× |",
            r.name,
            r.min(),
            r.median(),
            r.max(),
            r.median() / base,
            r.median() / one
        );
    }
    let per_filter = (rows[2].median() - base) / 3.0;
    println!(
        "\nPer no-op filter (3-filter row minus empty chain, / 3): {per_filter:.2} µs per stream"
    );

    let json = format!(
        "{{\"bench\":\"host-stream\",\"samples\":{samples},\"streams_per_sample\":{per_sample},\"unit\":\"us_per_stream\",\"rows\":[{}],\"per_noop_filter_us\":{per_filter:.3}}}\n",
        rows.iter()
            .map(|r| format!(
                "{{\"name\":\"{}\",\"min\":{:.3},\"median\":{:.3},\"max\":{:.3},\"samples\":[{}]}}",
                r.name,
                r.min(),
                r.median(),
                r.max(),
                r.samples_us.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(",")
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    if std::fs::create_dir_all(&dir).is_ok() {
        let path = dir.join("host-stream.json");
        if std::fs::write(&path, json).is_ok() {
            println!("wrote {}", path.display());
        }
    }
}
