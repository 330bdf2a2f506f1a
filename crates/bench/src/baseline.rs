//! `--baseline FILE`: this run against an earlier JSON report. A metric 15 %
//! worse is a warning, 30 % worse is critical (the run fails). Pure: works on
//! the two JSON documents, so a report from an older bench still compares on
//! whatever metrics both have.

use std::fmt::Write as _;

use serde_json::Value;

pub const WARN_PCT: f64 = 15.0;
pub const CRIT_PCT: f64 = 30.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Ok,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
        }
    }
}

/// A compared number.
struct Metric {
    name: String,
    value: Option<f64>,
    better: Better,
    /// Differences smaller than this are noise, whatever their percentage
    /// (a P99 of 0.30 ms against 0.25 ms is not a 20 % regression worth a
    /// page; one of 3.0 ms against 2.5 ms is).
    noise: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub old: f64,
    pub new: f64,
    /// How much worse the new value is, percent (negative: better).
    pub worse_pct: f64,
    pub severity: Severity,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Comparison {
    pub rows: Vec<Row>,
    /// Metrics one of the reports lacks.
    pub skipped: Vec<String>,
    pub notes: Vec<String>,
}

impl Comparison {
    pub fn worst(&self) -> Severity {
        self.rows.iter().map(|r| r.severity).max().unwrap_or(Severity::Ok)
    }

    pub fn to_text(&self, file: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "against baseline {file} (warning at {WARN_PCT} % worse, critical at {CRIT_PCT} %):"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "  {:<34} {:>12} -> {:<12} {:>+7.1} % worse  {}",
                r.name,
                super::report::num(r.old),
                super::report::num(r.new),
                r.worse_pct,
                r.severity.as_str()
            );
        }
        for name in &self.skipped {
            let _ = writeln!(s, "  {name:<34} not in both reports");
        }
        for note in &self.notes {
            let _ = writeln!(s, "  note: {note}");
        }
        s
    }
}

/// Compares `new` with `old`; an error when they are not comparable.
pub fn compare(old: &Value, new: &Value) -> Result<Comparison, String> {
    let kind = |doc: &Value| doc["kind"].as_str().unwrap_or("?").to_owned();
    if kind(old) != kind(new) {
        return Err(format!(
            "the baseline is a {:?} report and this run is a {:?} report",
            kind(old),
            kind(new)
        ));
    }
    let old_metrics = metrics(old);
    let new_metrics = metrics(new);
    let mut comparison = Comparison::default();
    for n in &new_metrics {
        let o = old_metrics.iter().find(|o| o.name == n.name).and_then(|o| o.value);
        match (o, n.value) {
            (Some(old_value), Some(new_value)) if old_value > 0.0 => {
                let worse_pct = match n.better {
                    Better::Lower => (new_value - old_value) / old_value * 100.0,
                    Better::Higher => (old_value - new_value) / old_value * 100.0,
                };
                let severity = if (new_value - old_value).abs() < n.noise {
                    Severity::Ok
                } else if worse_pct >= CRIT_PCT {
                    Severity::Critical
                } else if worse_pct >= WARN_PCT {
                    Severity::Warning
                } else {
                    Severity::Ok
                };
                comparison.rows.push(Row {
                    name: n.name.clone(),
                    old: old_value,
                    new: new_value,
                    worse_pct,
                    severity,
                });
            }
            _ => comparison.skipped.push(n.name.clone()),
        }
    }
    if old["config"] != new["config"] {
        let differing: Vec<String> = new["config"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| old["config"].get(k.as_str()) != Some(v))
            .map(|(k, v)| format!("{k} {} -> {v}", old["config"][k.as_str()]))
            .collect();
        comparison.notes.push(format!(
            "the runs were configured differently ({}): numbers may not be comparable",
            differing.join(", ")
        ));
    }
    Ok(comparison)
}

fn metrics(doc: &Value) -> Vec<Metric> {
    let at = |pointer: &str| doc.pointer(pointer).and_then(Value::as_f64);
    match doc["kind"].as_str() {
        Some("writers_only") => doc["results"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| Metric {
                name: format!(
                    "commits/s {} sync_commit={}",
                    r["capture"].as_str().unwrap_or("?"),
                    if r["synchronous_commit"] == true { "on" } else { "off" }
                ),
                value: r["commits_per_s"].as_f64(),
                better: Better::Higher,
                noise: 0.0,
            })
            .collect(),
        _ => vec![
            Metric {
                name: "P99 commit-to-receive (ms)".into(),
                value: at("/latency_ms/p99"),
                better: Better::Lower,
                noise: 0.05,
            },
            Metric {
                name: "deliveries/s".into(),
                value: at("/deliveries/per_s"),
                better: Better::Higher,
                noise: 0.0,
            },
            Metric {
                name: "gateway CPU ms per 1k deliveries".into(),
                value: at("/gateway/cpu_ms_per_1k_deliveries"),
                better: Better::Lower,
                noise: 0.01,
            },
            Metric {
                name: "gateway RSS per connection (B)".into(),
                value: at("/gateway/rss_per_connection_bytes"),
                better: Better::Lower,
                noise: 512.0,
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample;

    fn doc() -> Value {
        serde_json::to_value(sample()).unwrap()
    }

    #[test]
    fn same_numbers_are_ok() {
        let c = compare(&doc(), &doc()).unwrap();
        assert_eq!(c.rows.len(), 4);
        assert_eq!(c.worst(), Severity::Ok);
        assert!(c.notes.is_empty());
    }

    #[test]
    fn grades_regressions_in_the_right_direction() {
        let old = doc();
        let mut new = doc();
        // P99 2.0 -> 2.4 ms: 20 % worse, a warning.
        new["latency_ms"]["p99"] = 2.4.into();
        let c = compare(&old, &new).unwrap();
        assert_eq!(c.worst(), Severity::Warning);
        assert_eq!(c.rows[0].severity, Severity::Warning);
        assert!((c.rows[0].worse_pct - 20.0).abs() < 1e-9);

        // Deliveries/s 50k -> 34k: 32 % fewer, critical (higher is better).
        new["deliveries"]["per_s"] = 34_000.0.into();
        let c = compare(&old, &new).unwrap();
        assert_eq!(c.worst(), Severity::Critical);
        assert_eq!(c.rows[1].severity, Severity::Critical);

        // Better numbers are never regressions.
        let mut better = doc();
        better["latency_ms"]["p99"] = 0.5.into();
        better["deliveries"]["per_s"] = 90_000.0.into();
        better["gateway"]["rss_per_connection_bytes"] = 100.0.into();
        assert_eq!(compare(&old, &better).unwrap().worst(), Severity::Ok);
    }

    #[test]
    fn small_absolute_differences_are_noise() {
        let mut old = doc();
        old["latency_ms"]["p99"] = 0.20.into();
        let mut new = doc();
        new["latency_ms"]["p99"] = 0.24.into();
        assert_eq!(compare(&old, &new).unwrap().worst(), Severity::Ok);
    }

    #[test]
    fn missing_metrics_are_skipped_and_config_changes_noted() {
        let old = doc();
        let mut new = doc();
        new["gateway"] = Value::Null;
        new["config"]["connections"] = 10.into();
        let c = compare(&old, &new).unwrap();
        assert_eq!(c.rows.len(), 2);
        assert_eq!(c.skipped.len(), 2);
        assert!(c.notes[0].contains("connections 1000 -> 10"), "{:?}", c.notes);
        assert!(c.to_text("old.json").contains("not in both reports"));
    }

    #[test]
    fn refuses_different_kinds_and_compares_writer_costs() {
        let writers = |x: f64| {
            serde_json::json!({
                "kind": "writers_only",
                "config": {},
                "results": [{"capture": "none", "synchronous_commit": true, "commits_per_s": x}]
            })
        };
        assert!(compare(&doc(), &writers(1.0)).is_err());
        let c = compare(&writers(1000.0), &writers(600.0)).unwrap();
        assert_eq!(c.worst(), Severity::Critical);
        assert_eq!(c.rows[0].name, "commits/s none sync_commit=on");
    }
}
