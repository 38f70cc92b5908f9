//! What a rule is about and how it matches: the request types, the
//! compiled HTTP and channel targets (paths, hosts, headers, query values),
//! and a compiled rule.

use super::conditions::Condition;
use super::config::{ChannelAction, Effect};
use crate::channel::Pattern;
use crate::grants::Grants;
use crate::identity::Identity;
use crate::template::{Captures, ChannelTemplate, PathTemplate};
use regex_lite::Regex;

/// An HTTP request as the engine sees it (path already normalised).
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The raw query (without `?`), if any.
    pub query: Option<&'a str>,
    /// Request headers, names lower-case; the first value of a name counts.
    pub headers: &'a [(String, String)],
}

impl<'a> HttpRequest<'a> {
    /// A request with no query and no headers.
    pub fn new(method: &'a str, host: &'a str, path: &'a str) -> HttpRequest<'a> {
        HttpRequest {
            method,
            host,
            path,
            query: None,
            headers: &[],
        }
    }

    pub(super) fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The first value of a query parameter, percent- and `+`-decoded; `None`
/// if absent or not decodable to UTF-8.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    filter_common::form::query_value(query, name)
}

/// What is being decided.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    Http(HttpRequest<'a>),
    Channel {
        pattern: &'a Pattern,
        action: ChannelAction,
    },
}

pub(super) enum PathMatch {
    Exact(String),
    Prefix(String),
    Template(PathTemplate),
    /// The regex, and the literal text every match starts with.
    Regex(Regex, String),
}

pub(super) enum ValueMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present(bool),
}

impl ValueMatch {
    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (ValueMatch::Present(want), v) => v.is_some() == *want,
            (_, None) => false,
            (ValueMatch::Exact(e), Some(v)) => v == e,
            (ValueMatch::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
            (ValueMatch::Regex(re), Some(v)) => re.is_match(v),
        }
    }
}

pub(super) enum Target {
    Http {
        methods: Vec<String>,
        hosts: Vec<String>,
        path: Option<PathMatch>,
        headers: Vec<(String, ValueMatch)>,
        query: Vec<(String, ValueMatch)>,
    },
    Channel {
        template: ChannelTemplate,
        actions: Vec<ChannelAction>,
    },
}

pub(super) struct Rule {
    pub(super) id: String,
    pub(super) effect: Effect,
    pub(super) shadow: bool,
    pub(super) target: Target,
    pub(super) when: Vec<Condition>,
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let host = host.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes().get(host.len() - suffix.len() - 1) == Some(&b'.')
        }
        None => pattern == host,
    }
}

impl Rule {
    pub(super) fn applies(
        &self,
        identity: &Identity,
        request: &Request<'_>,
        caps: &mut Captures,
        grants: &dyn Grants,
    ) -> bool {
        let target = match (&self.target, request) {
            (
                Target::Http {
                    methods,
                    hosts,
                    path,
                    headers,
                    query,
                },
                Request::Http(r),
            ) => {
                (methods.is_empty() || methods.iter().any(|m| m == r.method))
                    && (hosts.is_empty() || hosts.iter().any(|h| host_matches(h, r.host)))
                    && match path {
                        None => true,
                        Some(PathMatch::Exact(p)) => r.path == p,
                        Some(PathMatch::Prefix(p)) => r.path.starts_with(p.as_str()),
                        Some(PathMatch::Template(t)) => t.matches(r.path, caps),
                        Some(PathMatch::Regex(re, prefix)) => {
                            r.path.starts_with(prefix.as_str()) && re.is_match(r.path)
                        }
                    }
                    && headers.iter().all(|(n, m)| m.matches(r.header(n)))
                    && query
                        .iter()
                        .all(|(n, m)| m.matches(r.query.and_then(|q| query_param(q, n)).as_deref()))
            }
            (Target::Channel { template, actions }, Request::Channel { pattern, action }) => {
                actions.contains(action) && template.covers(pattern, caps)
            }
            _ => false,
        };
        target && self.when.iter().all(|c| c.holds(identity, caps, grants))
    }
}
