//! Results: rows of per-pass values, the targets, the markdown table and the JSON file.

use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::Summary;

/// One measured quantity of one case: its value in every measured pass.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// Case label (`postgres→rabbitmq, 1000 keys`).
    pub case: String,
    /// What was measured (`relay`, `raw broker`, `relay / min(raw)`).
    pub quantity: String,
    /// Unit (`msg/s`, `ms`, `×`, `WCU/msg`).
    pub unit: String,
    /// The value of each measured pass, in pass order.
    pub passes: Vec<f64>,
    /// Median, min and max of `passes`.
    pub summary: Option<Summary>,
}

/// A target of the issue and how this run did against it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    /// `P1` .. `P7`.
    pub id: &'static str,
    /// The target as the issue states it.
    pub target: &'static str,
    /// The figures it was judged on.
    pub figure: String,
    /// Met or missed; `None` when not judged (quick mode, or the case did not run).
    pub met: Option<bool>,
}

/// Everything a run produced.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Measured rows, in run order.
    pub rows: Vec<Row>,
    /// Targets P1–P7.
    pub targets: Vec<TargetResult>,
    /// Cases that failed, with the error.
    pub failures: Vec<String>,
    /// Further markdown tables (the DynamoDB cost table).
    pub tables: Vec<String>,
    /// Free-form notes (counts used, caveats).
    pub notes: Vec<String>,
}

impl Report {
    /// Record a quantity measured in every pass.
    pub fn add(&mut self, scenario: &str, case: &str, quantity: &str, unit: &str, passes: &[f64]) {
        self.rows.push(Row {
            scenario: scenario.to_owned(),
            case: case.to_owned(),
            quantity: quantity.to_owned(),
            unit: unit.to_owned(),
            passes: passes.to_vec(),
            summary: Summary::of(passes),
        });
    }

    /// The median of a recorded quantity.
    pub fn median(&self, scenario: &str, case: &str, quantity: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.scenario == scenario && r.case == case && r.quantity == quantity)
            .and_then(|r| r.summary)
            .map(|s| s.median)
    }

    /// The markdown tables: results, then targets.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str("| scenario | case | quantity | median | min–max | unit | passes |\n");
        out.push_str("|---|---|---|---:|---:|---|---:|\n");
        for r in &self.rows {
            let (median, range) = match r.summary {
                Some(s) => (fmt(s.median), format!("{}–{}", fmt(s.min), fmt(s.max))),
                None => ("–".to_owned(), "–".to_owned()),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.case,
                r.quantity,
                median,
                range,
                r.unit,
                r.passes.len()
            );
        }
        for t in &self.tables {
            let _ = write!(out, "\n{t}");
        }
        if !self.targets.is_empty() {
            out.push_str("\n| target | | figures | |\n|---|---|---|---|\n");
            for t in &self.targets {
                let verdict = match t.met {
                    Some(true) => "met",
                    Some(false) => "missed",
                    None => "not judged",
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {verdict} |",
                    t.id, t.target, t.figure
                );
            }
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        for f in &self.failures {
            let _ = writeln!(out, "\n**FAILED**: {f}");
        }
        out
    }
}

/// A figure with sensible precision: 3 significant digits, thousands unseparated.
pub fn fmt(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_owned()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_median_and_range_of_the_passes() {
        let mut r = Report::default();
        r.add(
            "relay",
            "sqlite→memory",
            "relay",
            "msg/s",
            &[1000.0, 1200.0, 1100.0],
        );
        let md = r.markdown();
        assert!(
            md.contains("| relay | sqlite→memory | relay | 1100 | 1000–1200 | msg/s | 3 |"),
            "{md}"
        );
        assert_eq!(r.median("relay", "sqlite→memory", "relay"), Some(1100.0));
        assert_eq!(fmt(0.91234), "0.912");
        assert_eq!(fmt(12.345), "12.3");
    }
}
