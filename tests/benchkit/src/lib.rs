//! A small bench harness shared by the project's bench binaries.
//!
//! Cases are warmed up, then sampled in turn (case 1, case 2, … then again)
//! so that noise from a shared machine falls on all of them alike. Each
//! sample times `per_sample` calls and records µs per call; the table gives
//! min / median / max over the samples and the ratio of each median to a
//! reference case of the same run. `--quick` on the command line shortens
//! the run. Results are also written as JSON to `target/bench/<name>.json`.

use std::fmt::Write as _;
use std::time::Instant;

pub mod fixtures;

/// One case's samples, µs per call.
pub struct Row {
    pub name: String,
    pub samples_us: Vec<f64>,
}

impl Row {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.samples_us.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v.get(n / 2).copied().unwrap_or(f64::NAN),
            n => match (v.get(n / 2 - 1), v.get(n / 2)) {
                (Some(a), Some(b)) => (a + b) / 2.0,
                _ => f64::NAN,
            },
        }
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

/// Sampling plan.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub samples: usize,
    pub per_sample: usize,
}

impl Plan {
    /// `full` normally, `quick` with `--quick` on the command line.
    /// `BENCH_CALLS=<n>` in the environment overrides the calls per sample
    /// (longer runs for profiling).
    pub fn from_args(full: Plan, quick: Plan) -> Plan {
        let mut plan = if std::env::args().any(|a| a == "--quick") {
            quick
        } else {
            full
        };
        if let Some(n) = std::env::var("BENCH_CALLS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            plan.per_sample = n;
        }
        plan
    }
}

/// A named case: one call of the code under measurement.
pub type Case<'a> = (&'a str, Box<dyn FnMut() + 'a>);

/// Warms up every case, then samples them interleaved. With `BENCH_ONLY`
/// set in the environment, only the cases whose name contains it run (for
/// profiling one case under `perf`).
pub fn run(plan: Plan, cases: &mut [Case<'_>]) -> Vec<Row> {
    let only = std::env::var("BENCH_ONLY").ok();
    let mut selected: Vec<&mut Case<'_>> = cases
        .iter_mut()
        .filter(|(n, _)| only.as_deref().is_none_or(|o| n.contains(o)))
        .collect();
    let cases = &mut selected[..];
    for (_, f) in cases.iter_mut() {
        for _ in 0..plan.per_sample {
            f();
        }
    }
    let mut rows: Vec<Row> = cases
        .iter()
        .map(|(n, _)| Row {
            name: (*n).to_string(),
            samples_us: Vec::with_capacity(plan.samples),
        })
        .collect();
    for _ in 0..plan.samples {
        for (row, (_, f)) in rows.iter_mut().zip(cases.iter_mut()) {
            let t = Instant::now();
            for _ in 0..plan.per_sample {
                f();
            }
            row.samples_us
                .push(t.elapsed().as_secs_f64() * 1e6 / plan.per_sample as f64);
        }
    }
    rows
}

/// A markdown table; `refs` are the rows (by index) each median is divided by.
pub fn table(title: &str, rows: &[Row], refs: &[usize]) -> String {
    let mut out = format!("\n### {title}\n\n| case | min µs | median µs | max µs |");
    for &r in refs {
        let name = rows.get(r).map_or("?", |r| r.name.as_str());
        let _ = write!(out, " median / {name} |");
    }
    out.push_str("\n|---|---:|---:|---:|");
    for _ in refs {
        out.push_str("---:|");
    }
    out.push('\n');
    for row in rows {
        let _ = write!(
            out,
            "| {} | {:.3} | {:.3} | {:.3} |",
            row.name,
            row.min(),
            row.median(),
            row.max()
        );
        for &r in refs {
            let base = rows.get(r).map_or(f64::NAN, Row::median);
            let _ = write!(out, " {:.2}× |", row.median() / base);
        }
        out.push('\n');
    }
    out
}

/// Writes `target/bench/<name>.json` (relative to the workspace root,
/// found from `manifest_dir`); returns the path written.
pub fn write_json(manifest_dir: &str, name: &str, plan: Plan, rows: &[Row]) -> Option<String> {
    let rows_json: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"name\":{:?},\"min\":{:.4},\"median\":{:.4},\"max\":{:.4},\"samples\":[{}]}}",
                r.name,
                r.min(),
                r.median(),
                r.max(),
                r.samples_us
                    .iter()
                    .map(|x| format!("{x:.4}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect();
    let json = format!(
        "{{\"bench\":{name:?},\"samples\":{},\"calls_per_sample\":{},\"unit\":\"us_per_call\",\"rows\":[{}]}}\n",
        plan.samples,
        plan.per_sample,
        rows_json.join(",")
    );
    let path = bench_dir(manifest_dir)?.join(format!("{name}.json"));
    std::fs::write(&path, json).ok()?;
    Some(path.display().to_string())
}

/// Cargo's target directory for the workspace holding `manifest_dir`: an
/// absolute `CARGO_TARGET_DIR`; else what `cargo metadata` reports (it also
/// knows a cargo config's `build.target-dir`); else a relative
/// `CARGO_TARGET_DIR` under the workspace root, or `<root>/target`.
pub fn target_dir(manifest_dir: &str) -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let mut root = PathBuf::from(manifest_dir);
    while !root.join("Cargo.lock").is_file() {
        if !root.pop() {
            return None;
        }
    }
    let env = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    Some(match env {
        Some(dir) if dir.is_absolute() => dir,
        env => cargo_target_dir(&root)
            .or_else(|| env.map(|d| root.join(d)))
            .unwrap_or_else(|| root.join("target")),
    })
}

/// `target_directory` from `cargo metadata`, run in `root`.
fn cargo_target_dir(root: &std::path::Path) -> Option<std::path::PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    json_string_field(&String::from_utf8_lossy(&out.stdout), "target_directory")
        .map(std::path::PathBuf::from)
}

/// The string value of `"key":"…"` in a JSON document (escapes `\"`,
/// `\\` and `\/` undone; enough for a path cargo printed).
fn json_string_field(doc: &str, key: &str) -> Option<String> {
    let at = doc.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut out = String::new();
    let mut chars = doc.get(at..)?.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// `bench/` in cargo's target directory ([`target_dir`]), created.
pub fn bench_dir(manifest_dir: &str) -> Option<std::path::PathBuf> {
    let dir = target_dir(manifest_dir)?.join("bench");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_field_is_read_with_its_escapes() {
        let doc = r#"{"packages":[],"target_directory":"/a/\"b\"\\c","version":1}"#;
        assert_eq!(
            json_string_field(doc, "target_directory").as_deref(),
            Some("/a/\"b\"\\c")
        );
        assert_eq!(json_string_field(doc, "missing"), None);
        assert_eq!(json_string_field(r#"{"k":"open"#, "k"), None);
    }

    #[test]
    fn the_target_directory_is_cargos() {
        let dir = target_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
        assert!(dir.is_absolute(), "{}", dir.display());
        assert!(bench_dir(env!("CARGO_MANIFEST_DIR"))
            .unwrap()
            .starts_with(&dir));
    }

    #[test]
    fn median_min_max() {
        let r = Row {
            name: "x".into(),
            samples_us: vec![3.0, 1.0, 2.0, 10.0],
        };
        assert_eq!((r.min(), r.median(), r.max()), (1.0, 2.5, 10.0));
    }

    #[test]
    fn runs_every_case_and_tabulates_ratios() {
        let mut n = 0u64;
        let mut m = 0u64;
        let rows = {
            let mut cases: Vec<Case<'_>> =
                vec![("a", Box::new(|| n += 1)), ("b", Box::new(|| m += 2))];
            run(
                Plan {
                    samples: 3,
                    per_sample: 5,
                },
                &mut cases,
            )
        };
        assert_eq!((n, m), (20, 40)); // warm-up + 3 samples, 5 calls each
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.samples_us.len() == 3));
        let t = table("t", &rows, &[0]);
        assert!(t.contains("| a |") && t.contains("median / a"));
    }
}
