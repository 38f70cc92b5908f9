//! Rate limits from configuration files in envoyproxy/ratelimit's format
//! (github.com/envoyproxy/ratelimit, README "Configuration"), so that a stock
//! Envoy `rate_limits` configuration works unchanged. Parsing, validation and
//! matching only: no Redis, no I/O besides reading the files.
//!
//! One domain per YAML file; [`Limits::load`] takes a file or a directory,
//! whose `*.yaml` / `*.yml` files are read in name order (hidden files and
//! subdirectories skipped):
//!
//! ```yaml
//! domain: carbon
//! descriptors:
//!   # Envoy: request_headers x-auth-tenant -> tenant
//!   - key: tenant
//!     rate_limit: {unit: minute, requests_per_unit: 600}
//!     descriptors:
//!       - key: route
//!         value: "/api/v1/curves*"
//!         rate_limit: {unit: second, requests_per_unit: 20}
//!   - key: tenant
//!     value: acme
//!     rate_limit: {unit: minute, requests_per_unit: 6000, name: acme, replaces: [{name: default}]}
//!   - key: generic_key
//!     value: analytics
//!     rate_limit: {unit: hour, requests_per_unit: 1000}
//!     shadow_mode: true
//!   - key: remote_address
//!     rate_limit: {unlimited: true}
//! ```
//!
//! Matching ([`Limits::find`]), as envoyproxy/ratelimit: a request
//! descriptor's entries are consumed one level of the tree each. For an
//! entry `(k, v)` the child chosen is the one with key `k` and value `v`;
//! else the first (in config order) with key `k` whose value contains `*`
//! and matches `v` as a glob (`*`: zero or more characters); else the one
//! with key `k` and no value; else there is no limit. There is no
//! backtracking to a less specific child. The descriptor is limited only if
//! the node reached by its last entry has a `rate_limit`; a limit on a node
//! reached earlier does not apply.
//!
//! Differences from envoyproxy/ratelimit:
//! - `quota_mode`, `value_to_metric`, `share_threshold` and `metadata` are
//!   refused (not implemented here) rather than ignored; so are unknown keys.
//! - A `rate_limit` needs both `unit` and `requests_per_unit` unless
//!   `unlimited: true`, which allows neither (envoyproxy reads a missing
//!   `requests_per_unit` as 0). An explicit 0 is kept: every request is over
//!   the limit.
//! - `*` may appear anywhere in a value, several times (envoyproxy's
//!   README describes a trailing `*`, a prefix match).
//! - Siblings are duplicates when key and value are equal (envoyproxy
//!   compares `key_value` strings, so `key: a_b` and `key: a, value: b`
//!   collide there, not here).
//! - An integer written unquoted as `key` or `value` is read as its decimal
//!   text; other non-string scalars are refused.
//! - Inputs are bounded: [`MAX_FILE_BYTES`], [`MAX_DEPTH`], [`MAX_DESCRIPTORS`].
//!
//! As there, an empty `value` is the same as none, and an empty `name` is
//! no name.

use serde_norway::{Mapping, Value};
use std::fmt::Display;
use std::io::Read;
use std::path::Path;

/// Largest configuration file accepted, in bytes.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;
/// Deepest nesting of `descriptors` accepted (top-level descriptors are 1).
pub const MAX_DEPTH: usize = 16;
/// Most descriptors accepted, over all files together.
pub const MAX_DESCRIPTORS: usize = 100_000;

/// Fields of envoyproxy/ratelimit's format that this service refuses.
const UNSUPPORTED: &[&str] = &[
    "quota_mode",
    "value_to_metric",
    "share_threshold",
    "metadata",
];
const ROOT_FIELDS: &[&str] = &["domain", "descriptors"];
const DESCRIPTOR_FIELDS: &[&str] = &[
    "key",
    "value",
    "rate_limit",
    "descriptors",
    "shadow_mode",
    "detailed_metric",
];
const RATE_LIMIT_FIELDS: &[&str] = &["unit", "requests_per_unit", "unlimited", "name", "replaces"];
const REPLACES_FIELDS: &[&str] = &["name"];

type Map<K, V> = foldhash::HashMap<K, V>;
type Set<T> = foldhash::HashSet<T>;

/// A rate limit unit of the v3 API: `RateLimitResponse.RateLimit.Unit`
/// numbers SECOND=1, MINUTE=2, HOUR=3, DAY=4, MONTH=5, YEAR=6, WEEK=7
/// (envoy/service/ratelimit/v3/rls.proto; WEEK was added last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// The unit's length; a month is 30 days, a year 365 days (as envoyproxy/ratelimit).
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    /// The `RateLimitResponse.RateLimit.Unit` enum number.
    pub fn proto(self) -> i32 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 2,
            Unit::Hour => 3,
            Unit::Day => 4,
            Unit::Month => 5,
            Unit::Year => 6,
            Unit::Week => 7,
        }
    }

    /// The unit of an enum number; None for UNKNOWN (0) and unassigned numbers.
    pub fn from_proto(n: i32) -> Option<Unit> {
        Unit::ALL.into_iter().find(|u| u.proto() == n)
    }

    /// The lower-case name used in configuration files: "second", "minute", ...
    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// The unit named `s`, case-insensitive.
    pub fn from_name(s: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|u| u.name().eq_ignore_ascii_case(s))
    }
}

/// The `rate_limit` of one configured descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// `(requests_per_unit, unit)`; None when `unlimited: true`.
    pub rate: Option<(u32, Unit)>,
    pub name: Option<String>,
    pub replaces: Vec<String>,
    pub shadow_mode: bool,
    pub detailed_metric: bool,
    /// The metric label for this limit, as envoyproxy's stat key: the domain
    /// and the config path, `carbon.tenant_acme.route`: `key_value` for
    /// nodes with a value (the pattern as written for wildcard nodes), `key`
    /// for those without.
    pub stat_key: String,
}

impl Limit {
    /// True when `unlimited: true`.
    pub fn is_unlimited(&self) -> bool {
        self.rate.is_none()
    }
}

/// One configured descriptor.
#[derive(Debug, Default)]
struct Node {
    limit: Option<Limit>,
    children: Level,
}

/// The children of a node (or a domain's top-level descriptors), by key.
#[derive(Debug, Default)]
struct Level {
    by_key: Map<String, KeyChildren>,
}

/// The children of one level sharing one key.
#[derive(Debug, Default)]
struct KeyChildren {
    exact: Map<String, Node>,
    /// Values containing `*`, in config order.
    wildcards: Vec<(String, Node)>,
    /// The child without a value.
    any: Option<Node>,
}

impl Level {
    fn pick(&self, key: &str, value: &str) -> Option<&Node> {
        let kc = self.by_key.get(key)?;
        if let Some(n) = kc.exact.get(value) {
            return Some(n);
        }
        if let Some((_, n)) = kc.wildcards.iter().find(|(p, _)| glob(p, value)) {
            return Some(n);
        }
        kc.any.as_ref()
    }
}

/// Parsed rate limit configuration: domains and their descriptor trees.
/// Immutable once built; share it behind an `Arc` and swap it on reload.
#[derive(Debug, Default)]
pub struct Limits {
    domains: Map<String, Level>,
    /// Domain names in load order.
    order: Vec<String>,
    descriptors: usize,
}

impl Limits {
    /// No domains: every lookup finds no limit.
    pub fn empty() -> Limits {
        Limits::default()
    }

    /// Parses configuration documents, one domain each. `docs`: (file name
    /// for errors, file text).
    pub fn parse(docs: &[(String, String)]) -> Result<Limits, String> {
        let mut b = Builder::default();
        for (file, text) in docs {
            b.add(file, text)?;
        }
        Ok(b.limits)
    }

    /// Reads a file, or every `*.yaml` / `*.yml` file of a directory in name
    /// order (hidden files and subdirectories skipped; symbolic links
    /// followed, as in a Kubernetes ConfigMap volume). Errors name the file.
    pub fn load(path: &Path) -> Result<Limits, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut files = Vec::new();
        if meta.is_dir() {
            let dir = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut names = Vec::new();
            for entry in dir {
                let entry = entry.map_err(|e| format!("{}: {e}", path.display()))?;
                let name = entry.file_name();
                let Some(s) = name.to_str() else { continue };
                if s.starts_with('.') || !(s.ends_with(".yaml") || s.ends_with(".yml")) {
                    continue;
                }
                let full = entry.path();
                let is_file = std::fs::metadata(&full)
                    .map_err(|e| format!("{}: {e}", full.display()))?
                    .is_file();
                if is_file {
                    names.push(name);
                }
            }
            names.sort();
            for name in names {
                files.push(path.join(name));
            }
        } else {
            files.push(path.to_path_buf());
        }
        // One file in memory at a time.
        let mut b = Builder::default();
        for file in files {
            let shown = file.display().to_string();
            let text = read_bounded(&file).map_err(|e| format!("{shown}: {e}"))?;
            b.add(&shown, &text)?;
        }
        Ok(b.limits)
    }

    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
    }

    /// Domain names, in load order.
    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }

    /// Descriptors configured, over all domains and levels.
    pub fn descriptor_count(&self) -> usize {
        self.descriptors
    }

    /// The limit for one request descriptor's entries, or None (unknown
    /// domain, no matching node, or the node reached has no `rate_limit`).
    pub fn find(&self, domain: &str, entries: &[(String, String)]) -> Option<&Limit> {
        self.find_iter(
            domain,
            entries.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// [`Limits::find`] over borrowed entries, e.g. straight from a request.
    pub fn find_iter<'e, I>(&self, domain: &str, entries: I) -> Option<&Limit>
    where
        I: IntoIterator<Item = (&'e str, &'e str)>,
    {
        let mut level = self.domains.get(domain)?;
        let mut reached: Option<&Node> = None;
        for (k, v) in entries {
            if let Some(node) = reached {
                level = &node.children;
            }
            reached = Some(level.pick(k, v)?);
        }
        reached?.limit.as_ref()
    }
}

/// Documents added one by one.
#[derive(Default)]
struct Builder {
    limits: Limits,
    /// Domain → the file that defined it.
    files: Map<String, String>,
}

impl Builder {
    fn add(&mut self, file: &str, text: &str) -> Result<(), String> {
        let (domain, level) = parse_doc(file, text, &mut self.limits.descriptors)?;
        if let Some(first) = self.files.get(domain.as_str()) {
            return Err(format!(
                "{file}: domain: duplicate domain '{domain}' in config file (first defined in {first})"
            ));
        }
        self.files.insert(domain.clone(), file.to_owned());
        self.limits.order.push(domain.clone());
        self.limits.domains.insert(domain, level);
        Ok(())
    }
}

/// The stat key envoyproxy/ratelimit uses for `detailed_metric: true`: the
/// domain and the request's entries, `domain.k1_v1.k2_v2` (`k` alone for an
/// empty value).
pub fn detailed_stat_key(domain: &str, entries: &[(String, String)]) -> String {
    let len = domain.len()
        + entries
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>();
    let mut s = String::with_capacity(len);
    s.push_str(domain);
    for (k, v) in entries {
        s.push('.');
        s.push_str(k);
        if !v.is_empty() {
            s.push('_');
            s.push_str(v);
        }
    }
    s
}

/// Glob match: `*` in `pattern` matches zero or more bytes, every other
/// byte itself. Iterative, O(len(pattern) · len(text)) at worst: on a
/// mismatch only the most recent `*` is retried one byte further (an earlier
/// star never needs to take more, since any later match can be moved left).
/// Byte-wise is correct for UTF-8: a literal starts with a leading byte and
/// so never matches from inside a character.
fn glob(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0usize, 0usize);
    // (pattern index after the last star, text index that star matched up to)
    let mut star: Option<(usize, usize)> = None;
    while let Some(&c) = t.get(ti) {
        match p.get(pi) {
            Some(b'*') => {
                pi += 1;
                star = Some((pi, ti));
            }
            Some(&pc) if pc == c => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    while p.get(pi) == Some(&b'*') {
        pi += 1;
    }
    pi == p.len()
}

/// Reads a file as UTF-8, refusing more than [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    String::from_utf8(buf).map_err(|e| format!("not UTF-8: {e}"))
}

fn too_large() -> String {
    format!("file larger than {MAX_FILE_BYTES} bytes (MAX_FILE_BYTES)")
}

/// `file: path: msg`, or `file: msg` at the root.
fn err(file: &str, path: &str, msg: impl Display) -> String {
    if path.is_empty() {
        format!("{file}: {msg}")
    } else {
        format!("{file}: {path}: {msg}")
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// The walk over one document: its file name for errors and the running
/// descriptor count (over all documents).
struct Walk<'a> {
    file: &'a str,
    count: &'a mut usize,
}

/// A mapping's fields, checked against `allowed`. Null counts as empty.
struct Fields<'v> {
    entries: Vec<(&'v str, &'v Value)>,
}

impl<'v> Fields<'v> {
    fn get(&self, name: &str) -> Option<&'v Value> {
        self.entries
            .iter()
            .find(|(k, v)| *k == name && !v.is_null())
            .map(|(_, v)| *v)
    }
}

impl Walk<'_> {
    fn err(&self, path: &str, msg: impl Display) -> String {
        err(self.file, path, msg)
    }

    fn fields<'v>(&self, path: &str, v: &'v Value, allowed: &[&str]) -> Result<Fields<'v>, String> {
        let map: &Mapping = match v {
            Value::Mapping(m) => m,
            Value::Null => {
                return Ok(Fields {
                    entries: Vec::new(),
                })
            }
            other => {
                return Err(self.err(path, format!("expected a mapping, found {}", kind(other))))
            }
        };
        let mut entries = Vec::with_capacity(map.len());
        for (k, val) in map {
            let Value::String(k) = k else {
                return Err(self.err(
                    path,
                    format!("field names must be strings, found {}", kind(k)),
                ));
            };
            if UNSUPPORTED.contains(&k.as_str()) {
                return Err(self.err(
                    &join(path, k),
                    "an envoyproxy/ratelimit field this service does not implement",
                ));
            }
            if !allowed.contains(&k.as_str()) {
                return Err(self.err(
                    &join(path, k),
                    format!("unknown field (expected one of: {})", allowed.join(", ")),
                ));
            }
            entries.push((k.as_str(), val));
        }
        Ok(Fields { entries })
    }

    /// A string field; an integer is taken as its decimal text.
    fn text(&self, path: &str, v: Option<&Value>) -> Result<Option<String>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
            Some(other) => Err(self.err(
                path,
                format!("expected a string, found {} (quote it)", kind(other)),
            )),
        }
    }

    fn string(&self, path: &str, v: Option<&Value>) -> Result<Option<String>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.err(path, format!("expected a string, found {}", kind(other)))),
        }
    }

    fn boolean(&self, path: &str, v: Option<&Value>) -> Result<bool, String> {
        match v {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.err(
                path,
                format!("expected true or false, found {}", kind(other)),
            )),
        }
    }

    fn list<'v>(&self, path: &str, v: Option<&'v Value>) -> Result<&'v [Value], String> {
        match v {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Sequence(s)) => Ok(s.as_slice()),
            Some(other) => Err(self.err(path, format!("expected a list, found {}", kind(other)))),
        }
    }

    /// The descriptors of one level. `path`: of the list itself
    /// (`descriptors`, `descriptors[1].descriptors`); `stat`: the parent's
    /// stat key; `depth`: of the descriptors in this list.
    fn level(
        &mut self,
        path: &str,
        list: Option<&Value>,
        stat: &str,
        depth: usize,
    ) -> Result<Level, String> {
        let items = self.list(path, list)?;
        if items.is_empty() {
            return Ok(Level::default());
        }
        if depth > MAX_DEPTH {
            return Err(self.err(
                path,
                format!("descriptors nested deeper than {MAX_DEPTH} levels (MAX_DEPTH)"),
            ));
        }
        let mut level = Level::default();
        let mut seen: Set<(String, Option<String>)> = Set::default();
        for (i, item) in items.iter().enumerate() {
            *self.count += 1;
            if *self.count > MAX_DESCRIPTORS {
                return Err(self.err(
                    path,
                    format!("more than {MAX_DESCRIPTORS} descriptors in total (MAX_DESCRIPTORS)"),
                ));
            }
            let dpath = format!("{path}[{i}]");
            let f = self.fields(&dpath, item, DESCRIPTOR_FIELDS)?;
            let kpath = join(&dpath, "key");
            let key = self.text(&kpath, f.get("key"))?.unwrap_or_default();
            if key.is_empty() {
                return Err(self.err(&kpath, "descriptor has empty key"));
            }
            let value = self
                .text(&join(&dpath, "value"), f.get("value"))?
                .filter(|v| !v.is_empty());
            let stat_key = match &value {
                Some(v) => format!("{stat}.{key}_{v}"),
                None => format!("{stat}.{key}"),
            };
            if !seen.insert((key.clone(), value.clone())) {
                return Err(self.err(
                    &dpath,
                    format!("duplicate descriptor composite key '{stat_key}'"),
                ));
            }
            let shadow_mode = self.boolean(&join(&dpath, "shadow_mode"), f.get("shadow_mode"))?;
            let detailed_metric =
                self.boolean(&join(&dpath, "detailed_metric"), f.get("detailed_metric"))?;
            let limit = match f.get("rate_limit") {
                None => None,
                Some(rl) => Some(self.rate_limit(
                    &join(&dpath, "rate_limit"),
                    rl,
                    shadow_mode,
                    detailed_metric,
                    &stat_key,
                )?),
            };
            let children = self.level(
                &join(&dpath, "descriptors"),
                f.get("descriptors"),
                &stat_key,
                depth + 1,
            )?;
            let node = Node { limit, children };
            let kc = level.by_key.entry(key).or_default();
            match value {
                None => kc.any = Some(node),
                Some(v) if v.contains('*') => kc.wildcards.push((v, node)),
                Some(v) => {
                    kc.exact.insert(v, node);
                }
            }
        }
        Ok(level)
    }

    fn rate_limit(
        &self,
        path: &str,
        v: &Value,
        shadow_mode: bool,
        detailed_metric: bool,
        stat_key: &str,
    ) -> Result<Limit, String> {
        let f = self.fields(path, v, RATE_LIMIT_FIELDS)?;
        let upath = join(path, "unit");
        let rpath = join(path, "requests_per_unit");
        let unlimited = self.boolean(&join(path, "unlimited"), f.get("unlimited"))?;
        let unit = self.string(&upath, f.get("unit"))?;
        let rpu = f.get("requests_per_unit");
        let rate = if unlimited {
            if unit.is_some() {
                return Err(self.err(&upath, "should not specify rate limit unit when unlimited"));
            }
            if rpu.is_some() {
                return Err(self.err(
                    &rpath,
                    "should not specify requests_per_unit when unlimited",
                ));
            }
            None
        } else {
            let Some(unit) = unit else {
                return Err(self.err(&upath, "missing (required unless unlimited: true)"));
            };
            let Some(u) = Unit::from_name(&unit) else {
                let names: Vec<&str> = Unit::ALL.iter().map(|u| u.name()).collect();
                return Err(self.err(
                    &upath,
                    format!("invalid rate limit unit '{unit}' ({})", names.join(", ")),
                ));
            };
            let Some(rpu) = rpu else {
                return Err(self.err(&rpath, "missing (required unless unlimited: true)"));
            };
            let n = match rpu {
                Value::Number(n) => match n.as_u64() {
                    Some(n) => u32::try_from(n).ok(),
                    None if n.is_i64() => None,
                    None => {
                        return Err(self.err(&rpath, "expected an integer, found a fraction"));
                    }
                },
                other => {
                    return Err(self.err(
                        &rpath,
                        format!("expected an integer, found {}", kind(other)),
                    ));
                }
            };
            let Some(n) = n else {
                return Err(self.err(&rpath, format!("out of range (0 to {})", u32::MAX)));
            };
            Some((n, u))
        };
        let name = self
            .string(&join(path, "name"), f.get("name"))?
            .filter(|n| !n.is_empty());
        let rlpath = join(path, "replaces");
        let mut replaces = Vec::new();
        for (i, item) in self.list(&rlpath, f.get("replaces"))?.iter().enumerate() {
            let ipath = format!("{rlpath}[{i}]");
            let rf = self.fields(&ipath, item, REPLACES_FIELDS)?;
            let npath = join(&ipath, "name");
            let r = self.string(&npath, rf.get("name"))?.unwrap_or_default();
            if r.is_empty() {
                return Err(self.err(&npath, "should not have an empty replaces entry"));
            }
            if name.as_deref() == Some(r.as_str()) {
                return Err(self.err(
                    &npath,
                    "replaces should not contain name of same descriptor",
                ));
            }
            replaces.push(r);
        }
        Ok(Limit {
            rate,
            name,
            replaces,
            shadow_mode,
            detailed_metric,
            stat_key: stat_key.to_owned(),
        })
    }
}

/// One document: its domain and top-level descriptors.
fn parse_doc(file: &str, text: &str, count: &mut usize) -> Result<(String, Level), String> {
    if text.len() > MAX_FILE_BYTES {
        return Err(err(file, "", too_large()));
    }
    let mut root: Value = serde_norway::from_str(text).map_err(|e| {
        let mut msg = format!("{file}: invalid YAML: {e}");
        if let Some(loc) = e.location() {
            if !msg.contains(" line ") {
                msg.push_str(&format!(" (line {} column {})", loc.line(), loc.column()));
            }
        }
        msg
    })?;
    root.apply_merge()
        .map_err(|e| err(file, "", format!("invalid YAML merge key: {e}")))?;
    let mut walk = Walk { file, count };
    let f = walk.fields("", &root, ROOT_FIELDS)?;
    let domain = walk.string("domain", f.get("domain"))?.unwrap_or_default();
    if domain.is_empty() {
        return Err(walk.err("domain", "config file cannot have empty domain"));
    }
    let level = walk.level("descriptors", f.get("descriptors"), &domain, 1)?;
    Ok((domain, level))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use super::*;
    use std::time::{Duration, Instant};

    const CARBON: &str = r#"
domain: carbon
descriptors:
  # Envoy: request_headers x-auth-tenant -> tenant
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 600}
    descriptors:
      - key: route
        value: "/api/v1/curves*"
        rate_limit: {unit: second, requests_per_unit: 20}
  - key: tenant
    value: acme
    rate_limit: {unit: minute, requests_per_unit: 6000, name: acme, replaces: [{name: default}]}
  - key: generic_key
    value: analytics
    rate_limit: {unit: hour, requests_per_unit: 1000}
    shadow_mode: true
  - key: remote_address
    rate_limit: {unlimited: true}
"#;

    fn one(text: &str) -> Result<Limits, String> {
        Limits::parse(&[("carbon.yaml".to_owned(), text.to_owned())])
    }

    fn parse_err(text: &str) -> String {
        one(text).expect_err("must be refused")
    }

    fn e(entries: &[(&str, &str)]) -> Vec<(String, String)> {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn find<'l>(l: &'l Limits, entries: &[(&str, &str)]) -> Option<&'l Limit> {
        l.find("carbon", &e(entries))
    }

    fn rate(l: &Limits, entries: &[(&str, &str)]) -> Option<(u32, Unit)> {
        find(l, entries).and_then(|x| x.rate)
    }

    /// The document `domain: carbon` with `body` under `descriptors:`.
    fn with(body: &str) -> String {
        format!("domain: carbon\ndescriptors:\n{body}")
    }

    fn assert_err(text: &str, expect: &str) {
        let got = parse_err(text);
        assert!(
            got.starts_with(expect),
            "expected {expect:?}\n     got {got:?}"
        );
    }

    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir().join(format!(
                "sidecar-limits-{tag}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn carbon_example() {
        let l = one(CARBON).unwrap();
        assert!(l.has_domain("carbon"));
        assert!(!l.has_domain("other"));
        assert_eq!(l.domains().collect::<Vec<_>>(), ["carbon"]);
        assert_eq!(l.descriptor_count(), 5);

        let t = find(&l, &[("tenant", "globex")]).unwrap();
        assert_eq!(t.rate, Some((600, Unit::Minute)));
        assert_eq!(t.stat_key, "carbon.tenant");
        assert_eq!(t.name, None);
        assert!(t.replaces.is_empty());

        let acme = find(&l, &[("tenant", "acme")]).unwrap();
        assert_eq!(acme.rate, Some((6000, Unit::Minute)));
        assert_eq!(acme.name.as_deref(), Some("acme"));
        assert_eq!(acme.replaces, ["default"]);
        assert_eq!(acme.stat_key, "carbon.tenant_acme");

        let r = find(
            &l,
            &[("tenant", "globex"), ("route", "/api/v1/curves/daily")],
        )
        .unwrap();
        assert_eq!(r.rate, Some((20, Unit::Second)));
        assert_eq!(r.stat_key, "carbon.tenant.route_/api/v1/curves*");
        assert_eq!(
            rate(&l, &[("tenant", "globex"), ("route", "/api/v1/curves")]),
            Some((20, Unit::Second))
        );
        assert_eq!(
            find(&l, &[("tenant", "globex"), ("route", "/api/v2/curves")]),
            None
        );
        // The exact node `tenant_acme` has no children; no fallback to `tenant`.
        assert_eq!(
            find(&l, &[("tenant", "acme"), ("route", "/api/v1/curves")]),
            None
        );

        let a = find(&l, &[("generic_key", "analytics")]).unwrap();
        assert_eq!(a.rate, Some((1000, Unit::Hour)));
        assert!(a.shadow_mode);
        assert!(!a.detailed_metric);
        assert_eq!(find(&l, &[("generic_key", "other")]), None);

        let ra = find(&l, &[("remote_address", "10.0.0.1")]).unwrap();
        assert!(ra.is_unlimited());
        assert_eq!(ra.rate, None);
        assert_eq!(ra.stat_key, "carbon.remote_address");

        assert_eq!(find(&l, &[("unknown", "x")]), None);
        assert_eq!(find(&l, &[]), None);
        assert_eq!(l.find("other", &e(&[("tenant", "acme")])), None);
        assert_eq!(
            l.find_iter("carbon", [("tenant", "acme")]).map(|x| x.rate),
            Some(Some((6000, Unit::Minute)))
        );
    }

    #[test]
    fn shareable() {
        fn is<T: Send + Sync + 'static>() {}
        is::<Limits>();
        is::<Limit>();
    }

    #[test]
    fn empty_limits() {
        let l = Limits::empty();
        assert!(!l.has_domain("carbon"));
        assert_eq!(l.domains().count(), 0);
        assert_eq!(l.descriptor_count(), 0);
        assert_eq!(find(&l, &[("tenant", "acme")]), None);
        let l = one("domain: carbon\n").unwrap();
        assert!(l.has_domain("carbon"));
        assert_eq!(find(&l, &[("tenant", "acme")]), None);
    }

    #[test]
    fn units() {
        for u in &Unit::ALL {
            assert_eq!(Unit::from_proto(u.proto()), Some(*u));
            assert_eq!(Unit::from_name(u.name()), Some(*u));
            assert_eq!(Unit::from_name(&u.name().to_uppercase()), Some(*u));
        }
        assert_eq!(
            Unit::ALL.map(Unit::proto),
            [1, 2, 3, 4, 7, 5, 6],
            "second minute hour day week month year"
        );
        assert_eq!(Unit::from_proto(0), None);
        assert_eq!(Unit::from_proto(8), None);
        assert_eq!(Unit::Second.seconds(), 1);
        assert_eq!(Unit::Minute.seconds(), 60);
        assert_eq!(Unit::Hour.seconds(), 3600);
        assert_eq!(Unit::Day.seconds(), 86_400);
        assert_eq!(Unit::Week.seconds(), 604_800);
        assert_eq!(Unit::Month.seconds(), 2_592_000);
        assert_eq!(Unit::Year.seconds(), 31_536_000);

        let l = one(&with(
            "  - {key: a, rate_limit: {unit: MINUTE, requests_per_unit: 1}}\n\
             \x20 - {key: b, rate_limit: {unit: Hour, requests_per_unit: 2}}\n\
             \x20 - {key: c, rate_limit: {unit: wEeK, requests_per_unit: 3}}\n",
        ))
        .unwrap();
        assert_eq!(rate(&l, &[("a", "x")]), Some((1, Unit::Minute)));
        assert_eq!(rate(&l, &[("b", "x")]), Some((2, Unit::Hour)));
        assert_eq!(rate(&l, &[("c", "x")]), Some((3, Unit::Week)));
    }

    #[test]
    fn exact_beats_wildcard_beats_key_only() {
        let l = one(&with(
            "  - {key: k, rate_limit: {unit: second, requests_per_unit: 1}}\n\
             \x20 - {key: k, value: 'ab*', rate_limit: {unit: second, requests_per_unit: 2}}\n\
             \x20 - {key: k, value: abc, rate_limit: {unit: second, requests_per_unit: 3}}\n",
        ))
        .unwrap();
        assert_eq!(rate(&l, &[("k", "abc")]), Some((3, Unit::Second)));
        assert_eq!(rate(&l, &[("k", "abd")]), Some((2, Unit::Second)));
        assert_eq!(rate(&l, &[("k", "ab")]), Some((2, Unit::Second)));
        assert_eq!(rate(&l, &[("k", "a")]), Some((1, Unit::Second)));
        assert_eq!(rate(&l, &[("k", "")]), Some((1, Unit::Second)));
        assert_eq!(rate(&l, &[("other", "abc")]), None);
    }

    #[test]
    fn wildcards_in_config_order() {
        let l = one(&with(
            "  - {key: k, value: 'a*', rate_limit: {unit: second, requests_per_unit: 1}}\n\
             \x20 - {key: k, value: 'ab*', rate_limit: {unit: second, requests_per_unit: 2}}\n\
             \x20 - {key: k, value: '*z', rate_limit: {unit: second, requests_per_unit: 3}}\n",
        ))
        .unwrap();
        // `ab*` is more specific but comes second.
        assert_eq!(rate(&l, &[("k", "abc")]), Some((1, Unit::Second)));
        assert_eq!(rate(&l, &[("k", "az")]), Some((1, Unit::Second)));
        assert_eq!(rate(&l, &[("k", "bz")]), Some((3, Unit::Second)));
        assert_eq!(rate(&l, &[("k", "b")]), None);
        let l = find(&l, &[("k", "bz")]).unwrap();
        assert_eq!(l.stat_key, "carbon.k_*z");
    }

    #[test]
    fn glob_patterns() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything", true),
            ("**", "", true),
            ("", "", true),
            ("", "a", false),
            ("a", "a", true),
            ("a", "ab", false),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ba", false),
            ("*c", "abc", true),
            ("*c", "abcd", false),
            ("a*c", "ac", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbbcd", false),
            ("a*c", "acbc", true),
            ("/api/*/curves", "/api/v1/curves", true),
            ("/api/*/curves", "/api/v1/v2/curves", true),
            ("/api/*/curves", "/api/v1/curves/x", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXcYb", false),
            ("a*b*c", "acbc", true),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b*", "xxbxxaxx", false),
            ("é*ü", "éaü", true),
            ("*ü", "üü", true),
            ("a*a*a*b", "aaaaab", true),
            ("a*a*a*b", "aaab", true),
            ("a*a*a*b", "aab", false),
        ];
        for &(p, t, want) in cases {
            assert_eq!(glob(p, t), want, "glob({p:?}, {t:?})");
        }
    }

    #[test]
    fn pathological_pattern_is_fast() {
        let text = "a".repeat(10_000);
        let start = Instant::now();
        assert!(!glob("a*a*a*a*a*a*a*b", &text));
        let l = one(&with(
            "  - {key: k, value: 'a*a*a*a*a*a*a*b', rate_limit: {unit: second, requests_per_unit: 1}}\n",
        ))
        .unwrap();
        for _ in 0..10 {
            assert_eq!(l.find_iter("carbon", [("k", text.as_str())]), None);
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "took {:?}",
            start.elapsed()
        );
        let mut yes = text.clone();
        yes.push('b');
        assert!(glob("a*a*a*a*a*a*a*b", &yes));
    }

    #[test]
    fn only_the_node_reached_by_the_last_entry_applies() {
        let l = one(&with(
            "  - key: a\n\
             \x20   rate_limit: {unit: second, requests_per_unit: 1}\n\
             \x20   descriptors:\n\
             \x20     - key: b\n\
             \x20       descriptors:\n\
             \x20         - key: c\n\
             \x20           rate_limit: {unit: second, requests_per_unit: 3}\n\
             \x20 - key: leaf\n\
             \x20   rate_limit: {unit: second, requests_per_unit: 9}\n",
        ))
        .unwrap();
        assert_eq!(rate(&l, &[("a", "1")]), Some((1, Unit::Second)));
        // `b` has no rate_limit; `a`'s, reached earlier, does not apply.
        assert_eq!(rate(&l, &[("a", "1"), ("b", "2")]), None);
        assert_eq!(
            rate(&l, &[("a", "1"), ("b", "2"), ("c", "3")]),
            Some((3, Unit::Second))
        );
        // Longer than the config: nothing applies.
        assert_eq!(
            rate(&l, &[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]),
            None
        );
        assert_eq!(rate(&l, &[("leaf", "1"), ("more", "2")]), None);
        // A path that leaves the tree.
        assert_eq!(rate(&l, &[("a", "1"), ("x", "2")]), None);
        // Order matters.
        assert_eq!(rate(&l, &[("b", "2"), ("a", "1")]), None);
    }

    #[test]
    fn stat_keys() {
        let l = one(&with(
            "  - key: a\n\
             \x20   value: v\n\
             \x20   descriptors:\n\
             \x20     - key: b\n\
             \x20       descriptors:\n\
             \x20         - key: c\n\
             \x20           value: 'x*y'\n\
             \x20           rate_limit: {unit: second, requests_per_unit: 3}\n\
             \x20         - key: d\n\
             \x20           value: ''\n\
             \x20           rate_limit: {unit: second, requests_per_unit: 4}\n",
        ))
        .unwrap();
        let c = find(&l, &[("a", "v"), ("b", "any"), ("c", "x-y")]).unwrap();
        assert_eq!(c.stat_key, "carbon.a_v.b.c_x*y");
        // An empty value is no value.
        let d = find(&l, &[("a", "v"), ("b", "any"), ("d", "z")]).unwrap();
        assert_eq!(d.stat_key, "carbon.a_v.b.d");
        assert_eq!(
            detailed_stat_key("carbon", &e(&[("a", "v"), ("b", "any"), ("c", "x-y")])),
            "carbon.a_v.b_any.c_x-y"
        );
        assert_eq!(detailed_stat_key("carbon", &e(&[("a", "")])), "carbon.a");
        assert_eq!(detailed_stat_key("carbon", &[]), "carbon");
    }

    #[test]
    fn unlimited_shadow_detailed() {
        let l = one(&with(
            "  - key: u\n\
             \x20   rate_limit: {unlimited: true, name: u}\n\
             \x20   shadow_mode: true\n\
             \x20 - key: s\n\
             \x20   rate_limit: {unit: second, requests_per_unit: 0, unlimited: false}\n\
             \x20   detailed_metric: true\n\
             \x20 - key: n\n\
             \x20   shadow_mode: true\n",
        ))
        .unwrap();
        let u = find(&l, &[("u", "1")]).unwrap();
        assert!(u.is_unlimited());
        assert!(u.shadow_mode);
        assert!(!u.detailed_metric);
        assert_eq!(u.name.as_deref(), Some("u"));
        let s = find(&l, &[("s", "1")]).unwrap();
        assert_eq!(
            s.rate,
            Some((0, Unit::Second)),
            "0 = every request over the limit"
        );
        assert!(s.detailed_metric);
        assert!(!s.shadow_mode);
        assert_eq!(find(&l, &[("n", "1")]), None);

        assert_err(
            &with("  - {key: u, rate_limit: {unlimited: true, unit: second}}\n"),
            "carbon.yaml: descriptors[0].rate_limit.unit: should not specify rate limit unit when unlimited",
        );
        assert_err(
            &with("  - {key: u, rate_limit: {unlimited: true, requests_per_unit: 5}}\n"),
            "carbon.yaml: descriptors[0].rate_limit.requests_per_unit: should not specify requests_per_unit when unlimited",
        );
    }

    #[test]
    fn replaces() {
        let l = one(&with(
            "  - key: a\n\
             \x20   rate_limit:\n\
             \x20     unit: second\n\
             \x20     requests_per_unit: 1\n\
             \x20     name: a\n\
             \x20     replaces:\n\
             \x20       - name: b\n\
             \x20       - name: c\n",
        ))
        .unwrap();
        assert_eq!(find(&l, &[("a", "1")]).unwrap().replaces, ["b", "c"]);

        let rl = "rate_limit: {unit: second, requests_per_unit: 1, name: a, replaces:";
        assert_err(
            &with(&format!("  - {{key: a, {rl} [{{name: b}}, {{name: ''}}]}}}}\n")),
            "carbon.yaml: descriptors[0].rate_limit.replaces[1].name: should not have an empty replaces entry",
        );
        assert_err(
            &with(&format!("  - {{key: a, {rl} [{{}}]}}}}\n")),
            "carbon.yaml: descriptors[0].rate_limit.replaces[0].name: should not have an empty replaces entry",
        );
        assert_err(
            &with(&format!("  - {{key: a, {rl} [{{name: a}}]}}}}\n")),
            "carbon.yaml: descriptors[0].rate_limit.replaces[0].name: replaces should not contain name of same descriptor",
        );
        assert_err(
            &with(&format!("  - {{key: a, {rl} [b]}}}}\n")),
            "carbon.yaml: descriptors[0].rate_limit.replaces[0]: expected a mapping, found a string",
        );
        assert_err(
            &with(&format!("  - {{key: a, {rl} [{{name: b, nme: c}}]}}}}\n")),
            "carbon.yaml: descriptors[0].rate_limit.replaces[0].nme: unknown field",
        );
    }

    #[test]
    fn errors() {
        let cases: &[(&str, &str)] = &[
            ("descriptors: []\n", "carbon.yaml: domain: config file cannot have empty domain"),
            ("domain: ''\n", "carbon.yaml: domain: config file cannot have empty domain"),
            ("", "carbon.yaml: domain: config file cannot have empty domain"),
            ("domain: 5\n", "carbon.yaml: domain: expected a string, found a number"),
            ("- a\n", "carbon.yaml: expected a mapping, found a list"),
            ("domain: carbon\ndomian: x\n", "carbon.yaml: domian: unknown field"),
            ("domain: carbon\ndescriptors: {key: a}\n", "carbon.yaml: descriptors: expected a list, found a mapping"),
            ("domain: carbon\n1: x\n", "carbon.yaml: field names must be strings, found a number"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limt: {}}\n", "carbon.yaml: descriptors[0].rate_limt: unknown field"),
            ("domain: carbon\ndescriptors:\n  - {value: a}\n", "carbon.yaml: descriptors[0].key: descriptor has empty key"),
            ("domain: carbon\ndescriptors:\n  - {key: ''}\n", "carbon.yaml: descriptors[0].key: descriptor has empty key"),
            ("domain: carbon\ndescriptors:\n  - {key: [a]}\n", "carbon.yaml: descriptors[0].key: expected a string, found a list"),
            ("domain: carbon\ndescriptors:\n  - {key: a, value: 1.5}\n", "carbon.yaml: descriptors[0].value: expected a string, found a number (quote it)"),
            ("domain: carbon\ndescriptors:\n  - {key: a, value: true}\n", "carbon.yaml: descriptors[0].value: expected a string, found a boolean"),
            ("domain: carbon\ndescriptors:\n  - a\n", "carbon.yaml: descriptors[0]: expected a mapping, found a string"),
            ("domain: carbon\ndescriptors:\n  - {key: a, shadow_mode: 'yes'}\n", "carbon.yaml: descriptors[0].shadow_mode: expected true or false, found a string"),
            ("domain: carbon\ndescriptors:\n  - {key: a, detailed_metric: 1}\n", "carbon.yaml: descriptors[0].detailed_metric: expected true or false, found a number"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: 5}\n", "carbon.yaml: descriptors[0].rate_limit: expected a mapping, found a number"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {}}\n", "carbon.yaml: descriptors[0].rate_limit.unit: missing (required unless unlimited: true)"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {unit: second}}\n", "carbon.yaml: descriptors[0].rate_limit.requests_per_unit: missing (required unless unlimited: true)"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {requests_per_unit: 5}}\n", "carbon.yaml: descriptors[0].rate_limit.unit: missing"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {unit: second, requests_per_unit: -1}}\n", "carbon.yaml: descriptors[0].rate_limit.requests_per_unit: out of range (0 to 4294967295)"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {unit: second, requests_per_unit: 4294967296}}\n", "carbon.yaml: descriptors[0].rate_limit.requests_per_unit: out of range"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {unit: second, requests_per_unit: 1.5}}\n", "carbon.yaml: descriptors[0].rate_limit.requests_per_unit: expected an integer, found a fraction"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {unit: second, requests_per_unit: '5'}}\n", "carbon.yaml: descriptors[0].rate_limit.requests_per_unit: expected an integer, found a string"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {unit: 1, requests_per_unit: 5}}\n", "carbon.yaml: descriptors[0].rate_limit.unit: expected a string, found a number"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {unit: second, requests_per_unit: 5, unlimited: 'no'}}\n", "carbon.yaml: descriptors[0].rate_limit.unlimited: expected true or false, found a string"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {unit: second, requests_per_unit: 5, name: [x]}}\n", "carbon.yaml: descriptors[0].rate_limit.name: expected a string, found a list"),
            ("domain: carbon\ndescriptors:\n  - {key: a, rate_limit: {unit: second, requests_per_unit: 5, shadow_mode: true}}\n", "carbon.yaml: descriptors[0].rate_limit.shadow_mode: unknown field"),
            ("domain: carbon\ndescriptors:\n  - {key: a}\n  - {key: a}\n", "carbon.yaml: descriptors[1]: duplicate descriptor composite key 'carbon.a'"),
            ("domain: carbon\ndescriptors:\n  - {key: tenant, value: acme}\n  - {key: tenant}\n  - {key: tenant, value: acme}\n", "carbon.yaml: descriptors[2]: duplicate descriptor composite key 'carbon.tenant_acme'"),
            ("domain: carbon\ndescriptors:\n  - {key: a, value: 'x*'}\n  - {key: a, value: 'x*'}\n", "carbon.yaml: descriptors[1]: duplicate descriptor composite key 'carbon.a_x*'"),
            ("domain: carbon\ndescriptors:\n  - {key: a, value: ''}\n  - {key: a}\n", "carbon.yaml: descriptors[1]: duplicate descriptor composite key 'carbon.a'"),
            (
                "domain: carbon\ndescriptors:\n  - key: a\n    descriptors:\n      - {key: b}\n      - key: c\n        descriptors:\n          - {key: d, rate_limit: {unit: fortnight, requests_per_unit: 1}}\n",
                "carbon.yaml: descriptors[0].descriptors[1].descriptors[0].rate_limit.unit: invalid rate limit unit 'fortnight' (second, minute, hour, day, week, month, year)",
            ),
            (
                "domain: carbon\ndescriptors:\n  - {key: a}\n  - key: b\n    descriptors:\n      - {key: c, rate_limit: {unit: fortnight, requests_per_unit: 1}}\n",
                "carbon.yaml: descriptors[1].descriptors[0].rate_limit.unit: invalid rate limit unit 'fortnight' (second, minute, hour, day, week, month, year)",
            ),
            ("domain: carbon\ndescriptors:\n  - key: a\n    descriptors:\n      - {key: b}\n      - {key: b}\n", "carbon.yaml: descriptors[0].descriptors[1]: duplicate descriptor composite key 'carbon.a.b'"),
            ("domain: carbon\ndescriptors:\n  - {key: a, value: !tag x}\n", "carbon.yaml: descriptors[0].value: expected a string, found a tagged value"),
        ];
        for &(text, expect) in cases {
            assert_err(text, expect);
        }
        // The same key and value in different branches is fine.
        let l = one("domain: carbon\ndescriptors:\n  - key: a\n    descriptors: [{key: b}]\n  - key: c\n    descriptors: [{key: b}]\n").unwrap();
        assert_eq!(l.descriptor_count(), 4);
    }

    #[test]
    fn unsupported_fields_are_refused() {
        for field in [
            "quota_mode",
            "value_to_metric",
            "share_threshold",
            "metadata",
        ] {
            let d = format!("domain: carbon\ndescriptors:\n  - {{key: a, {field}: true}}\n");
            assert_err(
                &d,
                &format!("carbon.yaml: descriptors[0].{field}: an envoyproxy/ratelimit field this service does not implement"),
            );
            let r = format!(
                "domain: carbon\ndescriptors:\n  - {{key: a, rate_limit: {{unit: second, requests_per_unit: 1, {field}: true}}}}\n"
            );
            assert_err(
                &r,
                &format!("carbon.yaml: descriptors[0].rate_limit.{field}: an envoyproxy/ratelimit field this service does not implement"),
            );
        }
    }

    #[test]
    fn not_yaml() {
        let got = parse_err("domain: carbon\ndescriptors:\n  - {key: a\n");
        assert!(got.starts_with("carbon.yaml: invalid YAML: "), "{got}");
        assert!(got.contains("line "), "{got}");
        assert!(got.contains("column "), "{got}");
        let got = parse_err("domain: carbon\ndomain: carbon\n");
        assert!(got.starts_with("carbon.yaml: invalid YAML: "), "{got}");
        let got = parse_err("domain: a\n---\ndomain: b\n");
        assert!(got.starts_with("carbon.yaml: invalid YAML: "), "{got}");
    }

    #[test]
    fn integer_values_and_merge_keys() {
        let l = one(&with(
            "  - key: status\n\
             \x20   value: 429\n\
             \x20   rate_limit: &base {unit: second, requests_per_unit: 7}\n\
             \x20 - key: port\n\
             \x20   rate_limit:\n\
             \x20     <<: *base\n\
             \x20     requests_per_unit: 8\n",
        ))
        .unwrap();
        assert_eq!(rate(&l, &[("status", "429")]), Some((7, Unit::Second)));
        assert_eq!(
            find(&l, &[("status", "429")]).unwrap().stat_key,
            "carbon.status_429"
        );
        assert_eq!(rate(&l, &[("port", "1")]), Some((8, Unit::Second)));
    }

    #[test]
    fn duplicate_domains_across_files() {
        let a = ("a.yaml".to_owned(), CARBON.to_owned());
        let b = ("b.yaml".to_owned(), "domain: carbon\n".to_owned());
        let c = ("c.yaml".to_owned(), "domain: other\n".to_owned());
        let got = Limits::parse(&[a.clone(), c.clone(), b]).unwrap_err();
        assert_eq!(
            got,
            "b.yaml: domain: duplicate domain 'carbon' in config file (first defined in a.yaml)"
        );
        let l = Limits::parse(&[c, a]).unwrap();
        assert_eq!(l.domains().collect::<Vec<_>>(), ["other", "carbon"]);
        assert!(l.has_domain("other"));
        assert_eq!(l.descriptor_count(), 5);
    }

    #[test]
    fn load_directory_and_file() {
        let dir = TempDir::new("dir");
        let p = &dir.0;
        std::fs::write(p.join("b-carbon.yaml"), CARBON).unwrap();
        std::fs::write(
            p.join("a-other.yml"),
            "domain: other\ndescriptors: [{key: k, rate_limit: {unit: day, requests_per_unit: 3}}]\n",
        )
        .unwrap();
        // Skipped: hidden, other extensions, directories.
        std::fs::write(p.join(".hidden.yaml"), "not: [valid").unwrap();
        std::fs::write(p.join("notes.txt"), "not: [valid").unwrap();
        std::fs::create_dir(p.join("sub.yaml")).unwrap();
        std::fs::create_dir(p.join("..data")).unwrap();
        std::fs::write(p.join("..data").join("x.yaml"), "not: [valid").unwrap();

        let l = Limits::load(p).unwrap();
        assert_eq!(l.domains().collect::<Vec<_>>(), ["other", "carbon"]);
        assert_eq!(l.descriptor_count(), 6);
        assert_eq!(
            l.find("other", &e(&[("k", "v")])).unwrap().rate,
            Some((3, Unit::Day))
        );
        assert_eq!(rate(&l, &[("tenant", "acme")]), Some((6000, Unit::Minute)));

        // One file.
        let l = Limits::load(&p.join("b-carbon.yaml")).unwrap();
        assert_eq!(l.domains().collect::<Vec<_>>(), ["carbon"]);

        // The second file in name order redefines a domain.
        std::fs::write(p.join("c-again.yaml"), "domain: other\n").unwrap();
        let got = Limits::load(p).unwrap_err();
        let first = p.join("a-other.yml").display().to_string();
        let second = p.join("c-again.yaml").display().to_string();
        assert_eq!(
            got,
            format!("{second}: domain: duplicate domain 'other' in config file (first defined in {first})")
        );
        std::fs::remove_file(p.join("c-again.yaml")).unwrap();

        // Errors name the file.
        std::fs::write(
            p.join("d-bad.yaml"),
            "domain: x\ndescriptors: [{key: ''}]\n",
        )
        .unwrap();
        let got = Limits::load(p).unwrap_err();
        let bad = p.join("d-bad.yaml").display().to_string();
        assert_eq!(
            got,
            format!("{bad}: descriptors[0].key: descriptor has empty key")
        );
        std::fs::remove_file(p.join("d-bad.yaml")).unwrap();

        // Too large on disk.
        let mut big = String::from("domain: big\n");
        big.push_str(&"#".repeat(MAX_FILE_BYTES));
        std::fs::write(p.join("e-big.yaml"), &big).unwrap();
        let got = Limits::load(p).unwrap_err();
        assert!(
            got.contains("e-big.yaml: file larger than 4194304 bytes (MAX_FILE_BYTES)"),
            "{got}"
        );
        std::fs::remove_file(p.join("e-big.yaml")).unwrap();

        // Empty directory: no domains.
        let empty = TempDir::new("empty");
        assert_eq!(Limits::load(&empty.0).unwrap().domains().count(), 0);

        let missing = p.join("missing");
        let got = Limits::load(&missing).unwrap_err();
        assert!(got.starts_with(&missing.display().to_string()), "{got}");
    }

    #[test]
    fn file_size_bound() {
        let mut text = String::from("domain: carbon\n");
        let pad = MAX_FILE_BYTES - text.len();
        text.push_str(&"#".repeat(pad));
        assert_eq!(text.len(), MAX_FILE_BYTES);
        assert!(one(&text).is_ok());
        text.push('#');
        assert_eq!(
            parse_err(&text),
            "carbon.yaml: file larger than 4194304 bytes (MAX_FILE_BYTES)"
        );
    }

    /// `depth` nested descriptors, the innermost limited.
    fn nested(depth: usize) -> String {
        let mut s = String::from("domain: carbon\ndescriptors:\n");
        for d in 0..depth {
            let pad = "  ".repeat(2 * d);
            s.push_str(&format!("{pad}  - key: k{d}\n"));
            if d + 1 < depth {
                s.push_str(&format!("{pad}    descriptors:\n"));
            } else {
                s.push_str(&format!(
                    "{pad}    rate_limit: {{unit: second, requests_per_unit: 1}}\n"
                ));
            }
        }
        s
    }

    #[test]
    fn depth_bound() {
        let l = one(&nested(MAX_DEPTH)).unwrap();
        let entries: Vec<(String, String)> = (0..MAX_DEPTH)
            .map(|d| (format!("k{d}"), "v".to_owned()))
            .collect();
        assert_eq!(
            l.find("carbon", &entries).unwrap().rate,
            Some((1, Unit::Second))
        );
        let got = parse_err(&nested(MAX_DEPTH + 1));
        let path = "descriptors[0].".repeat(MAX_DEPTH) + "descriptors";
        assert_eq!(
            got,
            format!("carbon.yaml: {path}: descriptors nested deeper than 16 levels (MAX_DEPTH)")
        );
    }

    #[test]
    fn descriptor_count_bound() {
        let doc = |domain: &str, n: usize| {
            let mut s = format!("domain: {domain}\ndescriptors:\n");
            for i in 0..n {
                s.push_str(&format!("- {{key: k, value: '{i}'}}\n"));
            }
            s
        };
        let half = MAX_DESCRIPTORS / 2;
        let ok = Limits::parse(&[
            ("a.yaml".to_owned(), doc("a", half)),
            ("b.yaml".to_owned(), doc("b", MAX_DESCRIPTORS - half)),
        ])
        .unwrap();
        assert_eq!(ok.descriptor_count(), MAX_DESCRIPTORS);
        assert!(ok.find("b", &e(&[("k", "7")])).is_none());
        let got = Limits::parse(&[
            ("a.yaml".to_owned(), doc("a", half)),
            ("b.yaml".to_owned(), doc("b", MAX_DESCRIPTORS - half + 1)),
        ])
        .unwrap_err();
        assert_eq!(
            got,
            "b.yaml: descriptors: more than 100000 descriptors in total (MAX_DESCRIPTORS)"
        );
    }
}
