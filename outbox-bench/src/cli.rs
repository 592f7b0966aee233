//! Command line: which scenarios and cases to run, and how.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Measure the outbox against the raw broker and the raw database, side by side.
#[derive(Debug, Parser, PartialEq)]
#[command(name = "outbox-bench", version)]
pub struct Cli {
    /// The scenario to run, or `all`.
    pub scenario: ScenarioArg,
    /// Narrow the scenario to the cases naming all of these words: backends (`sqlite`,
    /// `postgres`, `dynamodb`) and transports (`memory`, `rabbitmq`, `kafka`).
    pub filters: Vec<String>,
    /// Smoke mode for CI: tiny counts, targets not judged.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Measured passes per scenario (after one warm-up pass).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub passes: u32,
}

/// A scenario named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioArg {
    /// Every scenario.
    All,
    /// Transactions with a business row alone, plus a message, plus a hand-written row.
    Deposit,
    /// A pre-filled backlog drained by one relay, against the raw broker and raw store.
    Relay,
    /// Commit to broker-confirm latency at a steady rate.
    Latency,
    /// 1, 2 and 4 relays behind a 5 ms publish latency.
    Scaling,
    /// DynamoDB requests and capacity per message.
    #[value(name = "dynamodb-cost")]
    DynamodbCost,
    /// InboxProcessor against a hand-written consumer loop.
    Consumer,
}

/// A scenario that runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    /// See [`ScenarioArg::Deposit`].
    Deposit,
    /// See [`ScenarioArg::Relay`].
    Relay,
    /// See [`ScenarioArg::Latency`].
    Latency,
    /// See [`ScenarioArg::Scaling`].
    Scaling,
    /// See [`ScenarioArg::DynamodbCost`].
    DynamodbCost,
    /// See [`ScenarioArg::Consumer`].
    Consumer,
}

impl Scenario {
    /// Every scenario, in the order `all` runs them.
    pub const ALL: [Scenario; 6] = [
        Scenario::Deposit,
        Scenario::Relay,
        Scenario::Latency,
        Scenario::Scaling,
        Scenario::DynamodbCost,
        Scenario::Consumer,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Deposit => "deposit",
            Scenario::Relay => "relay",
            Scenario::Latency => "latency",
            Scenario::Scaling => "scaling",
            Scenario::DynamodbCost => "dynamodb-cost",
            Scenario::Consumer => "consumer",
        }
    }

    /// Its cases, each named by the backend and transport words it involves.
    pub fn cases(self) -> &'static [Case] {
        use Word::*;
        match self {
            Scenario::Deposit => &[&[Sqlite], &[Postgres], &[Dynamodb]],
            Scenario::Relay => &[
                &[Sqlite, Memory],
                &[Postgres, Rabbitmq],
                &[Postgres, Kafka],
                &[Dynamodb, Kafka],
            ],
            Scenario::Latency | Scenario::Consumer => &[&[Postgres, Rabbitmq], &[Postgres, Kafka]],
            Scenario::Scaling => &[&[Postgres, Rabbitmq]],
            Scenario::DynamodbCost => &[&[Dynamodb]],
        }
    }
}

/// A backend or transport word naming a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Word {
    /// SQLite backend.
    Sqlite,
    /// PostgreSQL backend.
    Postgres,
    /// DynamoDB backend (moto locally).
    Dynamodb,
    /// The in-memory broker.
    Memory,
    /// RabbitMQ transport.
    Rabbitmq,
    /// Kafka transport.
    Kafka,
}

impl Word {
    const ALL: [Word; 6] = [
        Word::Sqlite,
        Word::Postgres,
        Word::Dynamodb,
        Word::Memory,
        Word::Rabbitmq,
        Word::Kafka,
    ];

    /// The word as typed.
    pub fn as_str(self) -> &'static str {
        match self {
            Word::Sqlite => "sqlite",
            Word::Postgres => "postgres",
            Word::Dynamodb => "dynamodb",
            Word::Memory => "memory",
            Word::Rabbitmq => "rabbitmq",
            Word::Kafka => "kafka",
        }
    }

    fn parse(s: &str) -> Option<Word> {
        let s = s.to_ascii_lowercase();
        let s = match s.as_str() {
            "postgresql" | "pg" => "postgres",
            "dynamo" | "moto" => "dynamodb",
            "rabbit" | "amqp" => "rabbitmq",
            other => other,
        };
        Word::ALL.into_iter().find(|w| w.as_str() == s)
    }
}

/// A case: the words it involves (a backend, and a transport where there is one).
pub type Case = &'static [Word];

/// The label of a case, `postgres→rabbitmq`.
pub fn case_label(case: Case) -> String {
    case.iter()
        .map(|w| w.as_str())
        .collect::<Vec<_>>()
        .join("→")
}

/// What to run: the selected cases of each selected scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Scenario and its selected cases, in run order.
    pub runs: Vec<(Scenario, Vec<Case>)>,
}

/// Resolve the scenario and filter words into a plan.
///
/// # Errors
/// A message naming an unknown word, or a filter that selects no case.
pub fn plan(scenario: ScenarioArg, filters: &[String]) -> Result<Plan, String> {
    let mut words = Vec::new();
    for f in filters {
        match Word::parse(f) {
            Some(w) => words.push(w),
            None => {
                let known: Vec<&str> = Word::ALL.iter().map(|w| w.as_str()).collect();
                return Err(format!(
                    "unknown word {f:?}: cases are named by {}",
                    known.join(", ")
                ));
            }
        }
    }
    let scenarios: Vec<Scenario> = match scenario {
        ScenarioArg::All => Scenario::ALL.to_vec(),
        ScenarioArg::Deposit => vec![Scenario::Deposit],
        ScenarioArg::Relay => vec![Scenario::Relay],
        ScenarioArg::Latency => vec![Scenario::Latency],
        ScenarioArg::Scaling => vec![Scenario::Scaling],
        ScenarioArg::DynamodbCost => vec![Scenario::DynamodbCost],
        ScenarioArg::Consumer => vec![Scenario::Consumer],
    };
    let runs: Vec<(Scenario, Vec<Case>)> = scenarios
        .iter()
        .map(|&s| {
            let cases = s
                .cases()
                .iter()
                .copied()
                .filter(|c| words.iter().all(|w| c.contains(w)))
                .collect::<Vec<Case>>();
            (s, cases)
        })
        .filter(|(_, cases)| !cases.is_empty())
        .collect();
    if runs.is_empty() {
        let all: Vec<String> = scenarios
            .iter()
            .flat_map(|s| s.cases().iter().map(|c| case_label(c)))
            .collect();
        return Err(format!(
            "no case matches {:?}; the cases are: {}",
            filters.join(" "),
            all.join(", ")
        ));
    }
    Ok(Plan { runs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("outbox-bench").chain(args.iter().copied()))
    }

    #[test]
    fn scenario_with_filters_selects_one_case() {
        let cli = parse(&["relay", "postgres", "rabbitmq"]).expect("parses");
        assert_eq!(cli.scenario, ScenarioArg::Relay);
        let plan = plan(cli.scenario, &cli.filters).expect("plan");
        assert_eq!(
            plan.runs,
            vec![(Scenario::Relay, vec![&[Word::Postgres, Word::Rabbitmq][..]])]
        );
    }

    #[test]
    fn all_runs_every_scenario_and_one_word_narrows_all() {
        let everything = plan(ScenarioArg::All, &[]).expect("plan");
        assert_eq!(everything.runs.len(), 6);
        let kafka = plan(ScenarioArg::All, &["kafka".to_owned()]).expect("plan");
        let names: Vec<&str> = kafka.runs.iter().map(|(s, _)| s.name()).collect();
        assert_eq!(names, ["relay", "latency", "consumer"]);
        assert_eq!(
            kafka.runs[0].1.len(),
            2,
            "postgres→kafka and dynamodb→kafka"
        );
    }

    #[test]
    fn options_parse() {
        let cli = parse(&["all", "--quick", "--json", "out.json", "--passes", "5"]).expect("ok");
        assert!(cli.quick);
        assert_eq!(cli.json.as_deref(), Some(std::path::Path::new("out.json")));
        assert_eq!(cli.passes, 5);
        let cli = parse(&["dynamodb-cost"]).expect("ok");
        assert_eq!(cli.scenario, ScenarioArg::DynamodbCost);
        assert_eq!((cli.quick, cli.passes, cli.json), (false, 3, None));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        assert!(parse(&[]).is_err(), "a scenario is required");
        assert!(parse(&["fastest"]).is_err(), "unknown scenario");
        assert!(
            parse(&["relay", "--passes", "0"]).is_err(),
            "at least one pass"
        );
        let e = plan(ScenarioArg::Relay, &["mysql".to_owned()]).expect_err("unknown word");
        assert!(e.contains("mysql") && e.contains("postgres"), "{e}");
        let e = plan(ScenarioArg::Deposit, &["kafka".to_owned()]).expect_err("no case");
        assert!(e.contains("sqlite"), "lists the cases: {e}");
    }

    #[test]
    fn aliases_are_accepted() {
        let p = plan(ScenarioArg::Relay, &["PG".to_owned(), "rabbit".to_owned()]).expect("plan");
        assert_eq!(p.runs[0].1, vec![&[Word::Postgres, Word::Rabbitmq][..]]);
    }
}
