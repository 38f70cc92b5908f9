use crate::common::*;
use serde_json::json;
use wasm_host::{Host, LoadError, PluginConfig};

#[test]
fn canary_then_one_vm_per_worker_each_with_root_context_1() {
    let host = Host::builder().workers(3).build();
    probe(&host, json!({}));
    // canary + 3 workers, each `on_vm_start` on root context 1.
    assert_eq!(lines(&host, "vm_start root=1").len(), 4);
    assert_eq!(lines(&host, "configure root=1").len(), 4);
    let workers: Vec<_> = host
        .logs()
        .iter()
        .filter(|r| r.message.contains("vm_start"))
        .map(|r| r.worker)
        .collect();
    assert_eq!(workers, vec![None, Some(0), Some(1), Some(2)]);
}

#[test]
fn without_canary_only_workers_start() {
    let host = Host::builder().workers(2).canary(false).build();
    probe(&host, json!({}));
    assert_eq!(lines(&host, "vm_start").len(), 2);
}

#[test]
fn vm_and_plugin_configuration_reach_the_filter() {
    let host = Host::builder().workers(1).canary(false).build();
    host.load(
        probe_config(
            json!({"configure": [{"get_body": "plugin_config"}, {"get_body": "vm_config"}]}),
        )
        .vm_config("vm-settings"),
    )
    .unwrap();
    assert_eq!(
        lines(&host, "vm_start"),
        vec![r#"vm_start root=1 size=11 config="vm-settings""#]
    );
    let bodies = lines(&host, "body=");
    assert!(
        bodies[0].contains("get_body"),
        "plugin config readable in on_configure: {bodies:?}"
    );
    assert_eq!(bodies[1], r#"body="vm-settings""#);
}

#[test]
fn plugin_configuration_is_gone_after_on_configure() {
    let host = Host::builder().workers(1).canary(false).build();
    let p = probe(
        &host,
        json!({"request_headers": [{"get_body": "plugin_config"}]}),
    );
    let s = host.stream(&host.chain(&[&p]));
    s.request_headers(GET, true);
    // The plugin configuration (type 7) is NotFound outside on_configure,
    // which the SDK maps to None.
    assert_eq!(lines(&host, "body="), vec!["body=None"]);
}

#[test]
fn on_vm_start_false_is_a_load_error_with_the_filter_logs() {
    let host = Host::default();
    let err = host
        .load(probe_config(json!({})).vm_config("fail"))
        .err()
        .expect("must fail");
    assert!(matches!(err, LoadError::VmStart { .. }), "{err}");
    assert!(err.logs().iter().any(|l| l.contains("vm_start")), "{err}");
    assert!(err.to_string().contains("on_vm_start returned false"));
}

#[test]
fn on_configure_false_is_a_load_error_with_the_filter_logs() {
    let host = Host::default();
    let err = host
        .load(probe_config(
            json!({"configure_ok": false, "configure": [{"log": "rejecting"}]}),
        ))
        .err()
        .expect("must fail");
    assert!(matches!(err, LoadError::Configure { .. }), "{err}");
    assert!(err.logs().iter().any(|l| l.contains("rejecting")), "{err}");
}

#[test]
fn malformed_configuration_is_rejected_with_the_reason() {
    let host = Host::default();
    let err = host
        .load(probe_config(json!({"no_such_field": 1})))
        .err()
        .expect("must fail");
    assert!(
        err.to_string().contains("unknown field `no_such_field`"),
        "{err}"
    );
}

#[test]
fn a_trap_while_loading_is_a_load_error() {
    let host = Host::default();
    let err = host
        .load(probe_config(
            json!({"configure": [{"panic": "boom at start"}]}),
        ))
        .err()
        .expect("must fail");
    assert!(matches!(err, LoadError::Trap { .. }), "{err}");
    assert!(
        err.to_string().contains("boom at start"),
        "the SDK's panic hook logs the message: {err}"
    );
}

#[test]
fn a_missing_or_invalid_module_is_reported() {
    let host = Host::default();
    let err = host
        .load(PluginConfig::new("/nonexistent/filter.wasm"))
        .err()
        .expect("must fail");
    assert!(matches!(err, LoadError::Module { .. }), "{err}");
    let bad = std::env::temp_dir().join("wasm-host-not-a-module.wasm");
    std::fs::write(&bad, b"not wasm").unwrap();
    let err = host.load(PluginConfig::new(&bad)).err().expect("must fail");
    assert!(matches!(err, LoadError::Module { .. }), "{err}");
}

#[test]
#[should_panic(expected = "build the filters first: scripts/build-filters.sh")]
fn a_missing_wasm_fails_and_names_the_build_command() {
    wasm_host::wasm_path("no-such-filter");
}

#[test]
fn stream_context_ids_are_per_vm_and_never_reused() {
    let host = Host::builder().workers(2).build();
    let p = probe(&host, json!({}));
    let chain = host.chain(&[&p]);
    let mut ids = Vec::new();
    for _ in 0..4 {
        let s = host.stream(&chain);
        s.request_headers(GET, true);
        s.respond(200, &[], b"");
        ids.push((s.worker(), s.context_id(0).unwrap()));
    }
    assert_eq!(ids, vec![(0, 2), (1, 2), (0, 3), (1, 3)]);
}
