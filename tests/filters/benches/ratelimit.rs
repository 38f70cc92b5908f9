//! One request through the ratelimit filter (local mode) in the emulator
//! with 1, 2 and 4 worker VMs: one policy keyed by tenant, generous enough
//! that every request is admitted (the bucket is read, computed and
//! written back with CAS each time). A no-op filter is the reference.
//! `cargo bench -p filter-tests --bench ratelimit [-- --quick]`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use benchkit::Plan;
use filter_tests::ratelimit_config;
use serde_json::json;
use wasm_host::{Chain, Host, PluginConfig};

fn main() {
    let plan = Plan::from_args(
        Plan {
            samples: 30,
            per_sample: 2000,
        },
        Plan {
            samples: 10,
            per_sample: 300,
        },
    );
    let config = json!({"policies": [{"id": "per-tenant", "key": ["tenant"],
                                       "rate": {"requests": 1_000_000_000u64, "per": "second"}}]});
    let request: Vec<(&str, &str)> = vec![
        (":method", "GET"),
        (":path", "/api/v1/curves/EU-ETS/DEC26"),
        (":authority", "api.254carbon.test"),
        (":scheme", "https"),
        ("user-agent", "bench/1.0"),
        ("x-auth-subject", "4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60"),
        ("x-auth-tenant", "acme"),
        ("x-auth-roles", "viewer,trader"),
    ];
    let hosts: Vec<Host> = [1, 2, 4]
        .iter()
        .map(|&w| Host::builder().workers(w).build())
        .collect();
    let chains: Vec<(Chain, Chain)> = hosts
        .iter()
        .map(|h| {
            let noop = h
                .load(PluginConfig::new(wasm_host::wasm_path("noop")).name("noop"))
                .unwrap();
            let rl = h.load(ratelimit_config(&config)).unwrap();
            (h.chain(&[&noop]), h.chain(&[&rl]))
        })
        .collect();
    let one = |host: &Host, chain: &Chain| {
        let s = host.stream(chain);
        s.request_headers(&request, true);
        s.respond(200, &[], b"");
        debug_assert_eq!(s.response().and_then(|r| r.status()), Some(200));
    };
    let mut cases: Vec<benchkit::Case<'_>> = Vec::new();
    let names = [
        ("1 no-op filter, 1 VM", "ratelimit, 1 VM"),
        ("1 no-op filter, 2 VMs", "ratelimit, 2 VMs"),
        ("1 no-op filter, 4 VMs", "ratelimit, 4 VMs"),
    ];
    for ((h, (noop, rl)), (n1, n2)) in hosts.iter().zip(&chains).zip(names) {
        cases.push((n1, Box::new(move || one(h, noop))));
        cases.push((n2, Box::new(move || one(h, rl))));
    }
    let rows = benchkit::run(plan, &mut cases);
    print!(
        "{}",
        benchkit::table(
            &format!(
                "ratelimit (local mode): one request in the emulator ({} samples × {} requests)",
                plan.samples, plan.per_sample
            ),
            &rows,
            &[0],
        )
    );
    for pair in rows.chunks(2) {
        if let [noop, rl] = pair {
            println!(
                "{}: {:.2} µs over the no-op filter",
                rl.name,
                rl.median() - noop.median()
            );
        }
    }
    let rl = hosts[2].counter("wasmcustom.ratelimit.limited");
    assert_eq!(rl, 0, "the bench's limit is never reached");
    if let Some(p) = benchkit::write_json(env!("CARGO_MANIFEST_DIR"), "ratelimit", plan, &rows) {
        println!("wrote {p}");
    }

    // Memory under churn: distinct client addresses, each sending once,
    // 1 000 per (emulated) second, a table of 65 536 slots.
    let keys: u32 = if plan.per_sample < 1000 {
        100_000
    } else {
        1_000_000
    };
    let host = Host::builder().workers(2).build();
    let per_ip = json!({"policies": [{"id": "per-ip", "key": ["client_ip"], "rate": {"requests": 10, "per": "second"}}]});
    let rl = host.load(ratelimit_config(&per_ip)).unwrap();
    let chain = host.chain(&[&rl]);
    let start = std::time::Instant::now();
    for i in 0..keys {
        let opts = wasm_host::StreamOptions {
            source: format!("10.{}.{}.{}:40000", i >> 16 & 255, i >> 8 & 255, i & 255),
            ..wasm_host::StreamOptions::default()
        };
        let s = host.stream_with(&chain, opts);
        s.request_headers(&request, true);
        s.respond(200, &[], b"");
        if i % 1000 == 999 {
            host.advance(std::time::Duration::from_secs(1));
        }
    }
    println!(
        "\nchurn: {keys} distinct keys in {:.1} s: {} shared-data entries, {} bytes of keys and values; {} slots recycled, {} fail-open",
        start.elapsed().as_secs_f64(),
        host.shared_data_len(),
        host.shared_data_bytes(),
        host.counter("wasmcustom.ratelimit.slots_recycled"),
        host.counter("wasmcustom.ratelimit.fail_open"),
    );
}
