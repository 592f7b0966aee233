//! One result row per (scenario, pair), the verdict, and the markdown and JSON outputs.

use std::fmt::Write as _;

use serde::Serialize;

use crate::check::Tally;

/// The outcome of one scenario on one pair.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    /// Issue 13 number of the scenario.
    pub number: u8,
    /// Scenario name (`relay-crash`, ...).
    pub scenario: String,
    /// Store → broker pair (`pg-rabbitmq`, ...).
    pub pair: String,
    /// Repetitions (fault cycles) within the run.
    pub runs: u32,
    /// Messages committed.
    pub messages: u64,
    /// Deliveries received by the checking consumer.
    pub received: u64,
    /// Processes killed (SIGKILL) or paused (SIGSTOP).
    pub kills: u32,
    /// Committed messages never received (or never applied, behind the inbox).
    pub lost: u64,
    /// Deliveries of an already received message; `None` where not measured.
    pub duplicates: Option<u64>,
    /// Most duplicates the scenario allows (`Some(0)`: none at all).
    pub max_duplicates: Option<u64>,
    /// Business rows beyond one per message, behind the inbox; `None` where no inbox runs.
    pub duplicate_effects: Option<u64>,
    /// First receipts out of per-key order.
    pub order_violations: u64,
    /// Deliveries of unknown ids, or with another key or sequence than committed.
    pub corrupt: u64,
    /// Pending messages in the store at the end.
    pub pending: u64,
    /// Parked messages in the store at the end.
    pub parked: u64,
    /// Seconds the scenario took (set up and clean up included).
    pub seconds: f64,
    /// Whether every check held.
    pub passed: bool,
    /// What failed, one sentence each (empty when passed).
    pub failures: Vec<String>,
    /// Scenario-specific figures worth reading.
    pub notes: Vec<String>,
}

impl Row {
    /// A row for `scenario` on `pair`, nothing counted yet.
    pub fn new(number: u8, scenario: &str, pair: &str) -> Self {
        Row {
            number,
            scenario: scenario.to_owned(),
            pair: pair.to_owned(),
            ..Row::default()
        }
    }

    /// Take the consumer-side figures of `t`.
    pub fn absorb(&mut self, t: &Tally) {
        self.messages = t.messages;
        self.received = t.received;
        self.lost = t.lost;
        self.duplicates = Some(t.duplicates);
        self.order_violations = t.order_violations;
        self.corrupt = t.corrupt;
    }

    /// Record a failed check.
    pub fn fail(&mut self, why: impl Into<String>) {
        self.failures.push(why.into());
    }

    /// Judge the row: every count must be zero, duplicates within their bound, and nothing
    /// may have failed along the way. Sets and returns [`passed`](Self::passed).
    pub fn judge(&mut self) -> bool {
        let mut problems = Vec::new();
        if self.messages == 0 {
            problems.push("no message was committed: the run proved nothing".to_owned());
        }
        if self.lost > 0 {
            problems.push(format!("{} message(s) lost", self.lost));
        }
        if self.order_violations > 0 {
            problems.push(format!(
                "{} per-key order violation(s)",
                self.order_violations
            ));
        }
        if self.corrupt > 0 {
            problems.push(format!(
                "{} delivery(ies) of unknown ids or altered key/sequence",
                self.corrupt
            ));
        }
        if let Some(d) = self.duplicate_effects
            && d > 0
        {
            problems.push(format!("{d} duplicate effect(s) behind the inbox"));
        }
        if let (Some(d), Some(max)) = (self.duplicates, self.max_duplicates)
            && d > max
        {
            problems.push(format!(
                "{d} duplicate(s) at the broker, more than the {max} allowed"
            ));
        }
        if self.pending > 0 {
            problems.push(format!(
                "{} message(s) still pending at the end",
                self.pending
            ));
        }
        if self.parked > 0 {
            problems.push(format!("{} message(s) parked at the end", self.parked));
        }
        for p in problems {
            if !self.failures.contains(&p) {
                self.failures.push(p);
            }
        }
        self.passed = self.failures.is_empty();
        self.passed
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| v.to_string())
}

/// The results as a markdown table, then the failures and notes of each row.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(
        "| # | scenario | pair | runs | messages | kills | lost | duplicates at the broker | duplicate effects | order violations | pending/parked at end | seconds | verdict |\n",
    );
    s.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in rows {
        let dup = match (r.duplicates, r.max_duplicates) {
            (Some(d), Some(max)) => format!("{d} (≤ {max})"),
            (d, _) => opt(d),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {:.1} | {} |",
            r.number,
            r.scenario,
            r.pair,
            r.runs,
            r.messages,
            r.kills,
            r.lost,
            dup,
            opt(r.duplicate_effects),
            r.order_violations,
            r.pending,
            r.parked,
            r.seconds,
            if r.passed { "PASS" } else { "FAIL" }
        );
    }
    for r in rows {
        if r.failures.is_empty() && r.notes.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\n{} / {}:", r.scenario, r.pair);
        for f in &r.failures {
            let _ = writeln!(s, "- FAILED: {f}");
        }
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> Row {
        let mut r = Row::new(1, "relay-crash", "pg-rabbitmq");
        r.messages = 10;
        r.received = 12;
        r.duplicates = Some(2);
        r
    }

    #[test]
    fn a_clean_row_passes() {
        let mut r = clean();
        assert!(r.judge(), "{:?}", r.failures);
    }

    #[test]
    fn every_bad_figure_fails_the_row() {
        type Spoil = fn(&mut Row);
        let cases: Vec<(&str, Spoil)> = vec![
            ("lost", |r| r.lost = 1),
            ("order", |r| r.order_violations = 1),
            ("corrupt", |r| r.corrupt = 1),
            ("effects", |r| r.duplicate_effects = Some(1)),
            ("duplicates", |r| r.max_duplicates = Some(1)),
            ("pending", |r| r.pending = 1),
            ("parked", |r| r.parked = 1),
            ("nothing sent", |r| r.messages = 0),
            ("failure", |r| r.fail("a relay exited with code 1")),
        ];
        for (what, spoil) in cases {
            let mut r = clean();
            spoil(&mut r);
            assert!(!r.judge(), "{what} not flagged");
            assert!(!r.failures.is_empty());
            assert!(markdown(&[r]).contains("FAIL"), "{what}");
        }
    }

    #[test]
    fn zero_allowed_duplicates_means_none() {
        let mut r = clean();
        r.max_duplicates = Some(0);
        assert!(!r.judge());
        r.duplicates = Some(0);
        r.failures.clear();
        assert!(r.judge());
    }
}
