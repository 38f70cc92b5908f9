//! The ratelimit filter's core natively, for the wasm/native ratio: per
//! request what the filter does in local mode — match the policy, build
//! the key, and admit through the two-choice slot table over a store with
//! Envoy's shared-data semantics (get with CAS, set with CAS), here an
//! in-memory map. The same policy as `filter-tests --bench ratelimit`.
//! `cargo bench -p ratelimit-core --bench admit [-- --quick]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use benchkit::Plan;
use ratelimit_core::config::{RequestView, Settings};
use ratelimit_core::slots::{Admission, SlotStats, Store, Table};
use std::collections::HashMap;

/// Shared data in memory: a value and its CAS per key.
#[derive(Default)]
struct Memory {
    map: HashMap<String, (Vec<u8>, u32)>,
    next: u32,
}

impl Store for Memory {
    fn get(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.map.get(key) {
            Some((v, c)) => (Some(v.clone()), Some(*c)),
            None => (None, None),
        }
    }
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        let cur = self.map.get(key).map(|(_, c)| *c);
        if let (Some(want), Some(have)) = (cas, cur) {
            if want != have {
                return false;
            }
        }
        self.next += 1;
        self.map
            .insert(key.to_string(), (value.to_vec(), self.next));
        true
    }
}

fn main() {
    let plan = Plan::from_args(
        Plan {
            samples: 30,
            per_sample: 20_000,
        },
        Plan {
            samples: 10,
            per_sample: 2_000,
        },
    );
    let settings = Settings::from_json(
        br#"{"policies": [{"id": "per-tenant", "key": ["tenant"],
                           "rate": {"requests": 1000000000, "per": "second"}}]}"#,
    )
    .unwrap();
    let table = Table {
        prefix: "254carbon.ratelimit|".into(),
        slots: settings.slots,
        max_cas_retries: settings.max_cas_retries,
        seed: (1, 2),
    };
    let mut store = Memory::default();
    let mut now = 1_790_000_000_000_000_000u64;
    let view = RequestView {
        method: "GET",
        path: "/api/v1/curves/EU-ETS/DEC26",
        subject: Some("4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60"),
        tenant: Some("acme"),
        roles: Some("viewer,trader"),
        client_ip: Some("127.0.0.1"),
    };
    let mut one = || {
        now += 1000;
        let mut stats = SlotStats::default();
        for p in &settings.policies {
            if !p.matches(&view) {
                continue;
            }
            let key = p.key(&view, |_| None);
            match table.admit(&mut store, &key, &p.rate, now, &mut stats) {
                Admission::Done(o) => assert!(o.allowed),
                other => panic!("{other:?}"),
            }
        }
    };
    let rows = benchkit::run(
        plan,
        &mut [(
            "match + key + admit (GCRA, slot table, in-memory CAS store)",
            Box::new(&mut one),
        )],
    );
    print!(
        "{}",
        benchkit::table("ratelimit core natively (one request)", &rows, &[0])
    );
    if let Some(p) =
        benchkit::write_json(env!("CARGO_MANIFEST_DIR"), "ratelimit-native", plan, &rows)
    {
        println!("wrote {p}");
    }
}
