#![allow(dead_code)]
use serde_json::Value;
use wasm_host::{Host, Plugin, PluginConfig};

pub const GET: &[(&str, &str)] = &[
    (":method", "GET"),
    (":path", "/api/v1/curves/EU-ETS?at=now"),
    (":authority", "api.254carbon.test"),
    (":scheme", "https"),
];

pub fn probe_config(script: Value) -> PluginConfig {
    PluginConfig::new(wasm_host::wasm_path("probe"))
        .name("probe")
        .root_id("probe_root")
        .vm_id("probe_vm")
        .config_json(&script)
}

pub fn probe(host: &Host, script: Value) -> Plugin {
    match host.load(probe_config(script)) {
        Ok(p) => p,
        Err(e) => panic!("probe did not load: {e}"),
    }
}

/// Probe log lines (without the `probe: ` prefix) containing `needle`.
pub fn lines(host: &Host, needle: &str) -> Vec<String> {
    host.logs_containing(needle)
        .into_iter()
        .filter_map(|m| m.strip_prefix("probe: ").map(str::to_string))
        .collect()
}

/// Probe log lines (without the prefix) starting with `prefix`.
pub fn starting(host: &Host, prefix: &str) -> Vec<String> {
    lines(host, prefix)
        .into_iter()
        .filter(|l| l.starts_with(prefix))
        .collect()
}
