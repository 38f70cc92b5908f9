//! A test double of the [`Host`]: what a core does to the host is recorded,
//! what the host answers is set by the test, and time moves only when the
//! test says. Shared data, queues and metrics live in a [`World`] that
//! several hosts (one per worker) can share, as Envoy's do per VM id.
//!
//! Shared data follows Envoy's rules (CAS from a counter starting at 1,
//! an absent key accepts any CAS, 0 is unconditional) unless
//! [`FakeHost::strict`] makes it follow the stricter hosts': a CAS of 0
//! only creates, a non-zero CAS on an absent key is refused, a second
//! `set_tick_period` fails, and removing a request header does nothing (the
//! worst case a filter must survive: only replace and a rewrite of the map
//! take a client's value away).

use crate::host::{HeaderPairs, Host, HostError, Level, Map, MetricKind};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// What the workers of one VM id share.
#[derive(Debug, Default)]
pub struct World {
    pub shared: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
    pub queues: Vec<(String, VecDeque<Vec<u8>>)>,
    /// Metrics by name: kind and value.
    pub metrics: BTreeMap<String, (MetricKind, i64)>,
    metric_names: Vec<String>,
}

/// An HTTP or gRPC callout the core made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout: Duration,
    /// gRPC: (service, method).
    pub grpc: Option<(String, String)>,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A local reply the core sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Debug, Default)]
pub struct FakeHost {
    world: Rc<RefCell<World>>,
    /// The clock, shared with siblings.
    now: Rc<Cell<Duration>>,
    strict: bool,
    pub logs: RefCell<Vec<(Level, String)>>,
    pub ticks: RefCell<Vec<Duration>>,
    pub config: RefCell<Option<Vec<u8>>>,
    /// Header maps of the current stream and of the call response.
    pub request: RefCell<Vec<(String, Vec<u8>)>>,
    pub response: RefCell<Vec<(String, Vec<u8>)>>,
    pub call_headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub call_body: RefCell<Vec<u8>>,
    pub grpc_message: RefCell<Vec<u8>>,
    /// Properties by path, segments joined by NUL.
    pub properties: RefCell<HashMap<String, Vec<u8>>>,
    pub replies: RefCell<Vec<Reply>>,
    /// Context ids resumed (the effective one at the time).
    pub resumed: RefCell<Vec<u32>>,
    pub effective: Cell<u32>,
    /// Streams that are gone (`set_effective_context` refuses them).
    pub gone: RefCell<Vec<u32>>,
    pub calls: RefCell<Vec<Call>>,
    next_token: Cell<u32>,
    /// Clusters that exist (empty: every cluster does).
    pub clusters: RefCell<Vec<String>>,
}

impl FakeHost {
    /// A host at time `now` since the epoch.
    pub fn at(now: Duration) -> FakeHost {
        let h = FakeHost::default();
        h.now.set(now);
        h
    }

    /// A host whose shared data, CAS and tick period follow the strict
    /// hosts' rules.
    pub fn strict(mut self) -> FakeHost {
        self.strict = true;
        self
    }

    /// Another worker of the same VM id: same shared data, queues, metrics
    /// and clock, its own streams.
    pub fn sibling(&self) -> FakeHost {
        FakeHost {
            world: self.world.clone(),
            now: self.now.clone(),
            strict: self.strict,
            ..FakeHost::default()
        }
    }

    pub fn with_config(self, json: &serde_json::Value) -> FakeHost {
        *self.config.borrow_mut() = Some(json.to_string().into_bytes());
        self
    }

    pub fn advance(&self, by: Duration) {
        self.now.set(self.now.get() + by);
    }

    pub fn set_now(&self, now: Duration) {
        self.now.set(now);
    }

    /// Starts a new stream: these request headers, nothing else.
    pub fn stream(&self, context_id: u32, headers: &[(&str, &str)]) {
        *self.request.borrow_mut() = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        self.response.borrow_mut().clear();
        self.effective.set(context_id);
    }

    pub fn request_header(&self, name: &str) -> Option<String> {
        self.request
            .borrow()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn request_values(&self, name: &str) -> Vec<String> {
        self.request
            .borrow()
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        self.response
            .borrow()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn set_property(&self, path: &[&str], value: &[u8]) {
        self.properties
            .borrow_mut()
            .insert(path.join("\0"), value.to_vec());
    }

    /// Sets the response the next `on_http_call_response` reads; returns
    /// the body size to pass to it. `status` `None`: a reset.
    pub fn answer(&self, status: Option<u16>, headers: &[(&str, &str)], body: &[u8]) -> usize {
        let mut h: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        if let Some(s) = status {
            h.insert(0, (":status".into(), s.to_string().into_bytes()));
        }
        *self.call_headers.borrow_mut() = h;
        *self.call_body.borrow_mut() = body.to_vec();
        body.len()
    }

    /// The last callout made, if any.
    pub fn last_call(&self) -> Option<Call> {
        self.calls.borrow().last().cloned()
    }

    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.borrow_mut())
    }

    pub fn take_replies(&self) -> Vec<Reply> {
        std::mem::take(&mut *self.replies.borrow_mut())
    }

    pub fn last_reply(&self) -> Option<Reply> {
        self.replies.borrow().last().cloned()
    }

    /// A metric's value (0 if never touched).
    pub fn metric_value(&self, name: &str) -> i64 {
        self.world.borrow().metrics.get(name).map_or(0, |(_, v)| *v)
    }

    pub fn metric_names(&self) -> Vec<String> {
        self.world.borrow().metrics.keys().cloned().collect()
    }

    /// The kind a metric was defined with (`None`: never defined).
    pub fn metric_kind(&self, name: &str) -> Option<MetricKind> {
        self.world.borrow().metrics.get(name).map(|(k, _)| *k)
    }

    pub fn shared_value(&self, key: &str) -> Option<Vec<u8>> {
        self.world.borrow().shared.get(key).map(|(v, _)| v.clone())
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.logs.borrow().iter().any(|(_, m)| m.contains(needle))
    }

    pub fn queue_len(&self, name: &str) -> usize {
        self.world
            .borrow()
            .queues
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, q)| q.len())
    }

    fn map(&self, map: Map) -> &RefCell<Vec<(String, Vec<u8>)>> {
        match map {
            Map::RequestHeaders => &self.request,
            Map::ResponseHeaders => &self.response,
            Map::CallResponseHeaders => &self.call_headers,
        }
    }

    fn update_metric(&self, id: u32, f: impl FnOnce(&mut i64)) -> Result<(), HostError> {
        let mut w = self.world.borrow_mut();
        let name = w
            .metric_names
            .get(id as usize)
            .cloned()
            .ok_or(HostError::NotFound)?;
        if let Some((_, v)) = w.metrics.get_mut(&name) {
            f(v);
        }
        Ok(())
    }

    fn token(&self) -> u32 {
        let t = self.next_token.get() + 4;
        self.next_token.set(t);
        t
    }

    fn cluster_known(&self, cluster: &str) -> bool {
        let c = self.clusters.borrow();
        c.is_empty() || c.iter().any(|k| k == cluster)
    }
}

impl Host for FakeHost {
    fn now(&self) -> Duration {
        self.now.get()
    }

    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), HostError> {
        if self.strict && !self.ticks.borrow().is_empty() {
            return Err(HostError::BadArgument);
        }
        self.ticks.borrow_mut().push(period);
        Ok(())
    }

    fn plugin_configuration(&self) -> Option<Vec<u8>> {
        self.config.borrow().clone()
    }

    fn request_headers(&self) -> HeaderPairs {
        HeaderPairs::parse(HeaderPairs::serialize(&self.request.borrow()))
    }

    fn header(&self, map: Map, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self
            .map(map)
            .borrow()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone()))
    }

    fn replace_header(&self, map: Map, name: &str, value: &str) -> Result<(), HostError> {
        let mut m = self.map(map).borrow_mut();
        m.retain(|(k, _)| k != name);
        m.push((name.to_string(), value.as_bytes().to_vec()));
        Ok(())
    }

    fn remove_header(&self, map: Map, name: &str) -> Result<(), HostError> {
        if !(self.strict && map == Map::RequestHeaders) {
            self.map(map).borrow_mut().retain(|(k, _)| k != name);
        }
        Ok(())
    }

    fn set_request_headers(&self, pairs: &[(&str, &[u8])]) -> Result<(), HostError> {
        *self.request.borrow_mut() = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        Ok(())
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self.properties.borrow().get(&path.join("\0")).cloned())
    }

    fn send_reply(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        self.replies.borrow_mut().push(Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        });
        Ok(())
    }

    fn resume_request(&self) -> Result<(), HostError> {
        self.resumed.borrow_mut().push(self.effective.get());
        Ok(())
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostError> {
        if self.gone.borrow().contains(&context_id) {
            return Err(HostError::BadArgument);
        }
        self.effective.set(context_id);
        Ok(())
    }

    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        Ok(self.world.borrow().shared.get(key).cloned())
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), HostError> {
        let mut w = self.world.borrow_mut();
        let current = w.shared.get(key).map(|(_, c)| *c);
        let ok = match current {
            None => cas == 0 || !self.strict,
            Some(c) => c == cas || (cas == 0 && !self.strict),
        };
        if !ok {
            return Err(HostError::CasMismatch);
        }
        w.next_cas = w.next_cas.wrapping_add(1).max(1);
        let c = w.next_cas;
        w.shared.insert(key.to_string(), (value.to_vec(), c));
        Ok(())
    }

    fn register_queue(&self, name: &str) -> Result<u32, HostError> {
        let mut w = self.world.borrow_mut();
        if let Some(i) = w.queues.iter().position(|(n, _)| n == name) {
            return Ok(i as u32 + 1);
        }
        w.queues.push((name.to_string(), VecDeque::new()));
        Ok(w.queues.len() as u32)
    }

    fn enqueue(&self, queue: u32, value: &[u8]) -> Result<(), HostError> {
        let mut w = self.world.borrow_mut();
        let q = w
            .queues
            .get_mut((queue as usize).wrapping_sub(1))
            .ok_or(HostError::NotFound)?;
        q.1.push_back(value.to_vec());
        Ok(())
    }

    fn dequeue(&self, queue: u32) -> Result<Option<Vec<u8>>, HostError> {
        let mut w = self.world.borrow_mut();
        let q = w
            .queues
            .get_mut((queue as usize).wrapping_sub(1))
            .ok_or(HostError::NotFound)?;
        Ok(q.1.pop_front())
    }

    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostError> {
        if !self.cluster_known(cluster) {
            return Err(HostError::BadArgument);
        }
        for required in [":method", ":path", ":authority"] {
            if !headers.iter().any(|(k, _)| *k == required) {
                return Err(HostError::BadArgument);
            }
        }
        let token = self.token();
        self.calls.borrow_mut().push(Call {
            token,
            cluster: cluster.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.map(<[u8]>::to_vec),
            timeout,
            grpc: None,
        });
        Ok(token)
    }

    fn call_response_body(&self, size: usize) -> Vec<u8> {
        let b = self.call_body.borrow();
        b.get(..size.min(b.len())).unwrap_or(&[]).to_vec()
    }

    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, HostError> {
        if !self.cluster_known(cluster) {
            return Err(HostError::BadArgument);
        }
        let token = self.token();
        self.calls.borrow_mut().push(Call {
            token,
            cluster: cluster.to_string(),
            headers: Vec::new(),
            body: Some(message.to_vec()),
            timeout,
            grpc: Some((service.to_string(), method.to_string())),
        });
        Ok(token)
    }

    fn grpc_response(&self, size: usize) -> Vec<u8> {
        let b = self.grpc_message.borrow();
        b.get(..size.min(b.len())).unwrap_or(&[]).to_vec()
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let mut w = self.world.borrow_mut();
        if let Some(i) = w.metric_names.iter().position(|n| n == name) {
            return Ok(i as u32);
        }
        w.metric_names.push(name.to_string());
        w.metrics.insert(name.to_string(), (kind, 0));
        Ok(w.metric_names.len() as u32 - 1)
    }

    fn increment_metric(&self, id: u32, by: i64) -> Result<(), HostError> {
        self.update_metric(id, |v| *v += by)
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
        self.update_metric(id, |v| *v = i64::try_from(value).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn shared_data_follows_envoy_or_the_strict_hosts() {
        let h = FakeHost::default();
        assert!(h.shared_cas("k", b"1", 0), "absent: any CAS");
        let (_, c) = h.shared("k").unwrap();
        assert!(!h.shared_cas("k", b"2", c + 1));
        assert!(h.shared_cas("k", b"2", 0), "Envoy: 0 is unconditional");
        let s = FakeHost::default().strict();
        assert!(s.shared_cas("k", b"1", 0));
        assert!(!s.shared_cas("k", b"2", 0), "strict: 0 only creates");
        assert!(s.shared_put("k", b"3"), "read first, then CAS");
        assert!(
            !s.shared_cas("absent", b"1", 7),
            "strict: an absent key wants 0"
        );
        s.stream(2, &[("a", "1"), ("b", "2")]);
        s.drop_header(Map::RequestHeaders, "a");
        assert_eq!(
            s.request_header("a").as_deref(),
            Some("1"),
            "strict: removal does nothing"
        );
        s.strip_request_headers(&["a"]);
        assert_eq!(
            s.request_header("a"),
            None,
            "the map is rewritten without it"
        );
        assert_eq!(s.request_header("b").as_deref(), Some("2"));
        assert_eq!(s.shared_value("k").unwrap(), b"3");
        assert!(s.set_tick_period(Duration::from_secs(1)).is_ok());
        assert!(s.set_tick_period(Duration::from_secs(2)).is_err());
    }

    #[test]
    fn siblings_share_the_world_not_the_stream() {
        let a = FakeHost::default();
        let b = a.sibling();
        a.stream(2, &[("x", "1")]);
        assert!(a.shared_put("k", b"v"));
        assert_eq!(b.shared_value("k").unwrap(), b"v");
        assert_eq!(b.request_header("x"), None);
        let m = a.counter("c");
        b.increment(b.counter("c"), 2);
        a.increment(m, 1);
        assert_eq!(a.metric_value("c"), 3);
    }
}
