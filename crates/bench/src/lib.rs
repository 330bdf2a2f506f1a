//! ws-gateway-bench: `ws-gateway bench` (issue 7): the load-test framework. Beside the data
//! path, not on it: it drives a gateway from both ends and reports
//! commit-to-receive latency, losses, and the gateway's resource use.
//!
//! The tree reads as a run does: `plan` (presets and flags) -> `target` (the
//! database and gateway under test) -> `table` -> `clients` (WebSocket side)
//! and `writers` with `floor` (database side, on their own thread) ->
//! `ledger`, `frames`, `latency` (what arrived, and how fast) -> `report`,
//! `baseline` (what it means). `run` ties a delivery run together, with
//! `fanout` (`--fanout-floor`) the minimal server it runs first to compare;
//! `writer_cost` is the `--writers-only` mode, `soak` the chaos soak
//! (faults against two instances, an exact count at the end).

mod baseline;
mod clients;
mod clock;
mod fanout;
mod floor;
mod frames;
mod latency;
mod ledger;
mod plan;
mod procfs;
mod progress;
mod report;
mod run;
mod soak;
mod table;
mod target;
mod writer_cost;
mod writers;

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use plan::BenchArgs;

use baseline::Severity;

pub async fn run(args: BenchArgs) -> Result<()> {
    if let Some(addr) = &args.serve_fanout_floor {
        // The child a `--fanout-floor` run starts in the gateway's place.
        let db = args.db.as_deref().context("--serve-fanout-floor needs --db")?;
        return fanout::serve(addr, db, &args.channel).await;
    }
    // Read the baseline first: a typo in its name should not cost a run.
    let baseline = match &args.baseline {
        Some(path) => Some((path.display().to_string(), read_json(path)?)),
        None => None,
    };
    let interrupt = CancellationToken::new();
    let on_signal = interrupt.clone();
    let signals = tokio::spawn(async move {
        ws_gateway::shutdown_signal().await;
        on_signal.cancel();
    });
    let result = if args.scenario == plan::Scenario::Soak {
        match soak::run(&args, interrupt).await {
            Ok(report) => conclude(report, &baseline),
            Err(e) => Err(e),
        }
    } else if args.writers_only {
        match writer_cost::run(&args, interrupt).await {
            Ok(report) => conclude(report, &baseline),
            Err(e) => Err(e),
        }
    } else {
        match run::run(&args, interrupt).await {
            Ok(report) => conclude(report, &baseline),
            Err(e) => Err(e),
        }
    };
    signals.abort();
    let (json, passed, failures) = result?;
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    if passed {
        Ok(())
    } else {
        Err(anyhow!("bench failed: {}", failures.join("; ")))
    }
}

/// What the two kinds of report (delivery, writer cost) share at the end.
trait Verdict: Serialize {
    fn failures(&mut self) -> &mut Vec<String>;
    fn set_passed(&mut self, passed: bool);
    fn to_text(&self) -> String;
}

impl Verdict for report::Report {
    fn failures(&mut self) -> &mut Vec<String> {
        &mut self.failures
    }
    fn set_passed(&mut self, passed: bool) {
        self.passed = passed;
    }
    fn to_text(&self) -> String {
        report::Report::to_text(self)
    }
}

impl Verdict for soak::SoakReport {
    fn failures(&mut self) -> &mut Vec<String> {
        &mut self.failures
    }
    fn set_passed(&mut self, passed: bool) {
        self.passed = passed;
    }
    fn to_text(&self) -> String {
        soak::SoakReport::to_text(self)
    }
}

impl Verdict for writer_cost::CostReport {
    fn failures(&mut self) -> &mut Vec<String> {
        &mut self.failures
    }
    fn set_passed(&mut self, passed: bool) {
        self.passed = passed;
    }
    fn to_text(&self) -> String {
        writer_cost::CostReport::to_text(self)
    }
}

/// Compares with the baseline, prints the report: its JSON, whether it
/// passed, and why not.
fn conclude(
    mut report: impl Verdict,
    baseline: &Option<(String, serde_json::Value)>,
) -> Result<(serde_json::Value, bool, Vec<String>)> {
    let (comparison, regressions) = compare_with(&report_json(&report)?, baseline)?;
    report.failures().extend(regressions);
    let failures = report.failures().clone();
    report.set_passed(failures.is_empty());
    print!("{}{comparison}", report.to_text());
    Ok((report_json(&report)?, failures.is_empty(), failures))
}

/// Compares with the baseline: the comparison's text, and the failures it adds.
fn compare_with(
    new: &serde_json::Value,
    baseline: &Option<(String, serde_json::Value)>,
) -> Result<(String, Vec<String>)> {
    let Some((file, old)) = baseline else {
        return Ok((String::new(), Vec::new()));
    };
    let comparison = baseline::compare(old, new).map_err(|e| anyhow!("--baseline {file}: {e}"))?;
    let failures = match comparison.worst() {
        Severity::Critical => {
            let names: Vec<&str> = comparison
                .rows
                .iter()
                .filter(|r| r.severity == Severity::Critical)
                .map(|r| r.name.as_str())
                .collect();
            vec![format!("critical regression against {file}: {}", names.join(", "))]
        }
        Severity::Warning | Severity::Ok => Vec::new(),
    };
    Ok((comparison.to_text(file), failures))
}

fn report_json(report: &impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(report).context("serializing the report")
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the baseline {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("the baseline {} is not a JSON report", path.display()))
}
