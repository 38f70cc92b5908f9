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

use benchkit::Plan;
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

fn main() {
    let plan = Plan::from_args(
        Plan {
            samples: 30,
            per_sample: 2000,
        },
        Plan {
            samples: 10,
            per_sample: 500,
        },
    );
    let host = Host::builder().workers(2).build();
    let noop = |name: &str| {
        host.load(PluginConfig::new(wasm_host::wasm_path("noop")).name(name))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (a, b, c) = (noop("noop-a"), noop("noop-b"), noop("noop-c"));
    let empty = host.chain(&[]);
    let one = host.chain(&[&a]);
    let three = host.chain(&[&a, &b, &c]);
    let rows = benchkit::run(
        plan,
        &mut [
            (
                "empty chain (host only)",
                Box::new(|| one_stream(&host, &empty)),
            ),
            ("1 no-op filter", Box::new(|| one_stream(&host, &one))),
            ("3 no-op filters", Box::new(|| one_stream(&host, &three))),
        ],
    );
    print!(
        "{}",
        benchkit::table(
            &format!(
                "One request stream through the emulator ({} samples × {} streams, 2 worker VMs)",
                plan.samples, plan.per_sample
            ),
            &rows,
            &[0, 1],
        )
    );
    let per_filter = (rows[2].median() - rows[0].median()) / 3.0;
    println!(
        "\nPer no-op filter (3-filter row minus empty chain, / 3): {per_filter:.2} µs per stream"
    );
    if let Some(p) = benchkit::write_json(env!("CARGO_MANIFEST_DIR"), "host-stream", plan, &rows) {
        println!("wrote {p}");
    }
}
