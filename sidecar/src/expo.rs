//! Metrics exposition in both text formats a scraper may ask for:
//! Prometheus text 0.0.4 (the default) and OpenMetrics 1.0 (when `Accept`
//! names `application/openmetrics-text`). The registry of
//! `prometheus-client` speaks OpenMetrics only; [`to_prometheus`] rewrites
//! its output, and [`Writer`] writes the usage families in either format.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    OpenMetrics,
}

impl Format {
    /// OpenMetrics if the `Accept` header asks for it, else Prometheus.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
        }
    }
}

/// Writes metric families into a string.
pub struct Writer<'a> {
    pub out: &'a mut String,
    pub format: Format,
}

impl Writer<'_> {
    /// `# HELP` and `# TYPE` of a family. `name` is the family name
    /// without `_total`; counter samples are written as `name_total`.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let suffix = match (self.format, kind) {
            (Format::Prometheus, Kind::Counter) => "_total",
            _ => "",
        };
        let _ = writeln!(self.out, "# HELP {name}{suffix} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name}{suffix} {}", kind.name());
    }

    /// One sample: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Value) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_value(v, self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        match value {
            Value::Int(v) => {
                let _ = write!(self.out, "{v}");
            }
            Value::Float(v) => write_float(v, self.out),
        }
        self.out.push('\n');
    }
}

/// A sample value.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    Int(i64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

fn write_float(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{v}");
    }
}

/// A float as a label value (`le`): `0.005`, `+Inf`.
pub fn float_label(v: f64) -> String {
    let mut s = String::new();
    write_float(v, &mut s);
    if !s.contains(['.', 'e', 'I', 'N']) {
        s.push_str(".0");
    }
    s
}

fn escape_help(h: &str) -> String {
    h.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label value escaping (both formats): backslash, double quote, newline.
pub fn escape_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Rewrites OpenMetrics text (from `prometheus-client`) as Prometheus text:
/// counter families are named with `_total` in `# HELP`/`# TYPE`, `# UNIT`
/// lines, `_created` samples and `# EOF` go.
pub fn to_prometheus(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    let mut counters: Vec<&str> = Vec::new();
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(h) = help.take() {
                out.push_str(h);
                out.push('\n');
            }
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = kind == "counter";
            let renamed = if counter && !name.ends_with("_total") {
                counters.push(name);
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h
                    .strip_prefix("# HELP ")
                    .and_then(|r| r.split_once(' ').map(|(_, t)| t))
                    .unwrap_or("");
                let _ = writeln!(out, "# HELP {renamed} {text}");
            }
            let kind = if kind == "unknown" { "untyped" } else { kind };
            let _ = writeln!(out, "# TYPE {renamed} {kind}");
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        if sample.ends_with("_created")
            && counters
                .iter()
                .any(|c| sample.strip_suffix("_created") == Some(c))
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(h) = help {
        out.push_str(h);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_become_prometheus_counters() {
        let om = "# HELP sidecar_x Things.\n# TYPE sidecar_x counter\nsidecar_x_total 3\nsidecar_x_created 17.0\n# HELP sidecar_g A gauge.\n# TYPE sidecar_g gauge\nsidecar_g{a=\"b\"} 1\n# HELP sidecar_h H.\n# TYPE sidecar_h histogram\nsidecar_h_bucket{le=\"+Inf\"} 0\nsidecar_h_sum 0.0\nsidecar_h_count 0\n# EOF\n";
        let p = to_prometheus(om);
        assert_eq!(
            p,
            "# HELP sidecar_x_total Things.\n# TYPE sidecar_x_total counter\nsidecar_x_total 3\n# HELP sidecar_g A gauge.\n# TYPE sidecar_g gauge\nsidecar_g{a=\"b\"} 1\n# HELP sidecar_h H.\n# TYPE sidecar_h histogram\nsidecar_h_bucket{le=\"+Inf\"} 0\nsidecar_h_sum 0.0\nsidecar_h_count 0\n"
        );
    }

    #[test]
    fn writer_names_counters_per_format_and_escapes_labels() {
        for (format, head) in [
            (
                Format::Prometheus,
                "# HELP usage_requests_total Requests.\n# TYPE usage_requests_total counter\n",
            ),
            (
                Format::OpenMetrics,
                "# HELP usage_requests Requests.\n# TYPE usage_requests counter\n",
            ),
        ] {
            let mut s = String::new();
            let mut w = Writer {
                out: &mut s,
                format,
            };
            w.family("usage_requests", Kind::Counter, "Requests.");
            w.sample(
                "usage_requests_total",
                &[("tenant", "a\"b\\c\nd")],
                5u64.into(),
            );
            assert_eq!(
                s,
                format!("{head}usage_requests_total{{tenant=\"a\\\"b\\\\c\\nd\"}} 5\n")
            );
        }
        assert_eq!(float_label(0.005), "0.005");
        assert_eq!(float_label(1.0), "1.0");
        assert_eq!(float_label(f64::INFINITY), "+Inf");
    }

    #[test]
    fn accept_negotiation() {
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Prometheus
        );
    }
}
