//! Small helpers shared by the subcommands: the CLI error type, duration parsing and display.

use std::fmt;
use std::time::Duration;

/// An error reported to the user as `error: <message>` (and `hint: <hint>`) with a non-zero
/// exit code. Printed through [`scrub`](crate::location::scrub), so no password of a location
/// reaches the terminal even when a client library quotes one.
#[derive(Debug)]
pub struct CliError {
    message: String,
    hint: Option<String>,
}

impl CliError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            hint: None,
        }
    }

    /// Prefix the message with what was being done, e.g. `opening orders.db: ...`.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// What the user can do about it, printed on its own line.
    #[cfg_attr(
        not(any(feature = "sqlite", feature = "postgres", feature = "dynamodb")),
        allow(dead_code)
    )]
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The hint, if any.
    pub fn hint_text(&self) -> Option<&str> {
        self.hint.as_deref()
    }
}

/// The error for a location whose backend or transport this build was compiled without.
pub fn missing_feature(feature: &str) -> CliError {
    CliError::new(format!(
        "this build of outbox has no {feature} support (build outbox-cli with the cargo \
         feature `{feature}`)"
    ))
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

impl From<outbox_core::Error> for CliError {
    /// The error's own description, without the kind and retryability tags of its `Display`
    /// (those are for logs; a person at a terminal wants the sentence).
    fn from(e: outbox_core::Error) -> Self {
        let mut text = e.message().to_owned();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let s_text = s.to_string();
            if !text.contains(&s_text) {
                text = format!("{text}: {s_text}");
            }
            source = s.source();
        }
        CliError::new(text)
    }
}

#[cfg(feature = "sqlite")]
impl From<outbox_sqlite::rusqlite::Error> for CliError {
    fn from(e: outbox_sqlite::rusqlite::Error) -> Self {
        CliError::new(format!("sqlite: {e}"))
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::new(e.to_string())
    }
}

/// Print `text` and a newline on stdout. A closed pipe (`outbox list | head`) ends the
/// process quietly with exit code 0 instead of a panic.
pub fn out(text: impl fmt::Display) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}").and_then(|()| stdout.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Shorthand for results of the CLI.
pub type CliResult<T> = Result<T, CliError>;

/// Attach context to any error convertible to [`CliError`].
pub trait Context<T> {
    /// Prefix the error message with `what`.
    fn context(self, what: impl fmt::Display) -> CliResult<T>;
}

impl<T, E: Into<CliError>> Context<T> for Result<T, E> {
    fn context(self, what: impl fmt::Display) -> CliResult<T> {
        self.map_err(|e| e.into().context(what))
    }
}

/// Parse a duration written as a whole number and a unit: `500ms`, `30s`, `15m`, `2h`, `7d`,
/// `1w`. Used as a clap value parser, so the error names the expected form.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let expected =
        "expected a whole number followed by a unit (ms, s, m, h, d or w), e.g. 30s, 15m, 7d";
    if digits.is_empty() {
        return Err(format!("invalid duration {text:?}: {expected}"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: the number is too large"))?;
    let unit_secs: u64 = match unit.trim() {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        "" => {
            return Err(format!(
                "invalid duration {text:?}: missing unit; {expected}"
            ));
        }
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?}; {expected}"
            ));
        }
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("invalid duration {text:?}: too large"))
}

/// Render a duration compactly for people: `850ms`, `12.3s`, `4m 05s`, `3h 20m`, `2d 04h`;
/// whole units stay whole (`15m`, `2h`, `7d`).
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit} {small:02}{small_unit}")
        }
    };
    if secs < 1 {
        format!("{}ms", d.as_millis())
    } else if secs < 60 {
        if d.subsec_nanos() == 0 {
            format!("{secs}s")
        } else {
            format!("{:.1}s", d.as_secs_f64())
        }
    } else if secs < 3_600 {
        two(secs / 60, "m", secs % 60, "s")
    } else if secs < 86_400 {
        two(secs / 3_600, "h", (secs % 3_600) / 60, "m")
    } else {
        two(secs / 86_400, "d", (secs % 86_400) / 3_600, "h")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(parse_duration("1w"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for bad in [
            "banana",
            "",
            "7",
            "7x",
            "-3d",
            "1.5h",
            "d7",
            "99999999999999999999999s",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
        assert!(parse_duration("7").unwrap_err().contains("missing unit"));
        assert!(parse_duration("7x").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("18446744073709551615w")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn renders_durations() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human_duration(Duration::from_secs(245)), "4m 05s");
        assert_eq!(human_duration(Duration::from_secs(12_000)), "3h 20m");
        assert_eq!(human_duration(Duration::from_secs(187_200)), "2d 04h");
        assert_eq!(human_duration(Duration::from_secs(30)), "30s");
        assert_eq!(human_duration(Duration::from_secs(900)), "15m");
        assert_eq!(human_duration(Duration::from_secs(7_200)), "2h");
        assert_eq!(human_duration(Duration::from_secs(7 * 86_400)), "7d");
    }
}
