//! What the embedded proxy takes from `envoy/envoy.yaml`, so the local
//! stack runs the same configuration as Envoy: the first listener's
//! address, its routes (`path` / `prefix` → cluster), the wasm HTTP filters
//! in order with their plugin configurations, and the static clusters
//! (first endpoint; HTTP/2 when `explicit_http_config.http2_protocol_options`
//! is set). Anything else in the file is Envoy's business and ignored here.

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Gateway {
    pub listen: SocketAddr,
    pub routes: Vec<Route>,
    pub filters: Vec<WasmFilter>,
    pub clusters: Vec<Cluster>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub path: PathMatch,
    pub cluster: String,
}

#[derive(Debug, Clone)]
pub struct WasmFilter {
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
    pub file: PathBuf,
    /// The plugin configuration (the `StringValue`'s value).
    pub configuration: String,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub addr: SocketAddr,
    pub http2: bool,
}

fn at<'a>(v: &'a Value, path: &[&str], what: &str) -> Result<&'a Value, String> {
    let mut cur = v;
    for p in path {
        cur = match cur {
            Value::Object(m) => m.get(*p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| format!("{what}: missing {}", path.join(".")))?;
    }
    Ok(cur)
}

fn text<'a>(v: &'a Value, path: &[&str], what: &str) -> Result<&'a str, String> {
    at(v, path, what)?
        .as_str()
        .ok_or_else(|| format!("{what}: {} is not a string", path.join(".")))
}

fn socket(v: &Value, what: &str) -> Result<SocketAddr, String> {
    let host = text(v, &["address"], what)?;
    let port = at(v, &["port_value"], what)?
        .as_u64()
        .ok_or_else(|| format!("{what}: port_value is not a number"))?;
    format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("{what}: {host}:{port}: {e}"))
}

/// A wasm file named in the gateway file: relative to `root`, except that a
/// relative path under `target/` (Envoy's view, from the repository root) is
/// read in cargo's target directory, so filters built with `CARGO_TARGET_DIR`
/// are found.
pub fn wasm_file(root: &Path, name: &str) -> PathBuf {
    let path = Path::new(name);
    match path.strip_prefix("target") {
        Ok(rest) if path.is_relative() => wasm_host::target_dir().join(rest),
        _ => root.join(path),
    }
}

impl Gateway {
    /// Reads `file`; wasm paths are resolved against `root` (see [`wasm_file`]).
    pub fn load(file: &Path, root: &Path) -> Result<Gateway, String> {
        let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let v: Value =
            serde_yaml::from_slice(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
        Gateway::from_value(&v, root)
    }

    pub fn from_value(v: &Value, root: &Path) -> Result<Gateway, String> {
        let l = at(v, &["static_resources", "listeners", "0"], "listener")?;
        let listen = socket(
            at(l, &["address", "socket_address"], "listener")?,
            "listener",
        )?;
        let hcm = at(
            l,
            &["filter_chains", "0", "filters", "0", "typed_config"],
            "listener",
        )?;
        let mut routes = Vec::new();
        let hosts = at(hcm, &["route_config", "virtual_hosts"], "route_config")?;
        for h in hosts.as_array().into_iter().flatten() {
            for r in at(h, &["routes"], "virtual host")?
                .as_array()
                .into_iter()
                .flatten()
            {
                let m = at(r, &["match"], "route")?;
                let path = if let Some(p) = m.get("path").and_then(Value::as_str) {
                    PathMatch::Exact(p.to_string())
                } else if let Some(p) = m.get("prefix").and_then(Value::as_str) {
                    PathMatch::Prefix(p.to_string())
                } else {
                    return Err(format!(
                        "route {m}: only path and prefix matches are supported"
                    ));
                };
                routes.push(Route {
                    path,
                    cluster: text(r, &["route", "cluster"], "route")?.to_string(),
                });
            }
        }
        let mut filters = Vec::new();
        for f in at(hcm, &["http_filters"], "http_filters")?
            .as_array()
            .into_iter()
            .flatten()
        {
            let ty = f
                .pointer("/typed_config/@type")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !ty.ends_with("envoy.extensions.filters.http.wasm.v3.Wasm") {
                continue;
            }
            let c = at(f, &["typed_config", "config"], "wasm filter")?;
            let what = format!("wasm filter {}", text(c, &["name"], "wasm filter")?);
            filters.push(WasmFilter {
                name: text(c, &["name"], &what)?.to_string(),
                root_id: text(c, &["root_id"], &what)?.to_string(),
                vm_id: text(c, &["vm_config", "vm_id"], &what)?.to_string(),
                file: wasm_file(
                    root,
                    text(c, &["vm_config", "code", "local", "filename"], &what)?,
                ),
                configuration: text(c, &["configuration", "value"], &what)?.to_string(),
            });
        }
        let mut clusters = Vec::new();
        for c in at(v, &["static_resources", "clusters"], "clusters")?
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = text(c, &["name"], "cluster")?.to_string();
            let what = format!("cluster {name}");
            let addr = socket(
                at(
                    c,
                    &[
                        "load_assignment",
                        "endpoints",
                        "0",
                        "lb_endpoints",
                        "0",
                        "endpoint",
                        "address",
                        "socket_address",
                    ],
                    &what,
                )?,
                &what,
            )?;
            let http2 = c
                .pointer("/typed_extension_protocol_options/envoy.extensions.upstreams.http.v3.HttpProtocolOptions/explicit_http_config/http2_protocol_options")
                .is_some();
            clusters.push(Cluster { name, addr, http2 });
        }
        Ok(Gateway {
            listen,
            routes,
            filters,
            clusters,
        })
    }

    /// The cluster of the first route matching `path` (query ignored).
    pub fn route(&self, path: &str) -> Option<&Cluster> {
        let p = path.split('?').next().unwrap_or(path);
        let r = self.routes.iter().find(|r| match &r.path {
            PathMatch::Exact(e) => p == e,
            PathMatch::Prefix(pre) => p.starts_with(pre.as_str()),
        })?;
        self.cluster(&r.cluster)
    }

    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The plugin configuration of the wasm filter `name`, as JSON.
    fn filter_config(&self, name: &str) -> Result<Value, String> {
        let f = self
            .filters
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| format!("no {name} filter in the gateway configuration"))?;
        serde_json::from_str(&f.configuration).map_err(|e| format!("{name} configuration: {e}"))
    }

    /// The auth filter's configuration (the sidecar verifies in-band
    /// tokens with the same one).
    pub fn auth_config(&self) -> Result<Value, String> {
        self.filter_config("auth")
    }

    /// The entitlements policy of the `entitlements` filter's
    /// configuration: the sidecar enforces the same one on channels.
    pub fn entitlements_policy(&self) -> Result<Value, String> {
        self.filter_config("entitlements")?
            .get("policy")
            .cloned()
            .ok_or_else(|| "entitlements configuration: no inline policy".to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_repository_gateway_is_understood() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let g = Gateway::load(&root.join("envoy/envoy.yaml"), &root).unwrap();
        assert_eq!(g.listen, "127.0.0.1:10000".parse().unwrap());
        let names: Vec<&str> = g.filters.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["usage", "auth", "entitlements", "ratelimit"]);
        assert_eq!(g.route("/ws?access_token=x").unwrap().name, "sidecar");
        assert_eq!(
            g.route("/api/v1/curves/X/latest").unwrap().name,
            "demo_upstream"
        );
        assert!(g.route("/other").is_none());
        assert!(g.cluster("ratelimit").unwrap().http2);
        assert!(!g.cluster("idp").unwrap().http2);
        for f in &g.filters {
            serde_json::from_str::<Value>(&f.configuration).unwrap();
        }
        assert!(g.entitlements_policy().unwrap()["rules"].is_array());
        let release = wasm_host::target_dir().join("wasm32-wasip1/release");
        assert_eq!(g.filters[1].file, release.join("auth.wasm"));
    }

    #[test]
    fn wasm_files_outside_target_stay_under_the_root() {
        let root = Path::new("/repo");
        assert_eq!(
            wasm_file(root, "filters/x.wasm"),
            root.join("filters/x.wasm")
        );
        assert_eq!(
            wasm_file(root, "/abs/target/x.wasm"),
            Path::new("/abs/target/x.wasm")
        );
        assert_eq!(
            wasm_file(root, "targets/x.wasm"),
            root.join("targets/x.wasm")
        );
        assert_eq!(
            wasm_file(root, "target/dev/x.wasm"),
            wasm_host::target_dir().join("dev/x.wasm")
        );
    }
}
