//! Store and transport locations written as URLs, the same in flags and environment variables,
//! and the redaction that keeps their passwords out of every message.
//!
//! Parsing does not depend on the cargo features: a URL of a backend this build lacks parses,
//! and opening it then says which feature is missing.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use url::Url;

use crate::util::{CliError, CliResult};

/// Where the outbox is stored (`--store` / `OUTBOX_STORE`).
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// `sqlite://PATH[?prefix=P]`: a SQLite file (relative or absolute path).
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Table prefix (`None`: the backend's default).
        prefix: Option<String>,
    },
    /// `postgres://user:pass@host:port/db[?schema=S&prefix=P&...]`.
    Postgres {
        /// The connection URL without `schema` and `prefix` (other parameters kept).
        url: String,
        /// Schema (`None`: the backend's default).
        schema: Option<String>,
        /// Table prefix (`None`: the backend's default).
        prefix: Option<String>,
    },
    /// `dynamodb://[?region=R&endpoint=URL&prefix=P]`, credentials from the AWS default chain.
    DynamoDb {
        /// Region (`None`: the AWS configuration's).
        region: Option<String>,
        /// Endpoint (`None`: the AWS configuration's, e.g. `AWS_ENDPOINT_URL`).
        endpoint: Option<String>,
        /// Table prefix.
        prefix: String,
    },
}

/// Where the relay publishes (`--transport` / `OUTBOX_TRANSPORT`).
#[derive(Clone, PartialEq, Eq)]
pub enum TransportLocation {
    /// `kafka://host:port[,host:port...]`; other librdkafka settings from `OUTBOX_KAFKA_*`.
    Kafka {
        /// The bootstrap servers, comma-separated.
        brokers: String,
    },
    /// `amqp[s]://user:pass@host:port/vhost[?exchange=E&...]`.
    Amqp {
        /// The AMQP URL without `exchange` (other parameters kept).
        url: String,
        /// The exchange every topic is published to, with the topic as routing key
        /// (`""`, the default exchange, routes to the queue named like the topic).
        exchange: String,
    },
}

/// The table prefix of a DynamoDB location without `prefix=`: tables `outbox_outbox`,
/// `outbox_inbox`, `outbox_locks`.
pub const DEFAULT_DYNAMODB_PREFIX: &str = "outbox_";

impl StoreLocation {
    /// Parse a store URL; the error names the problem and shows the URL redacted.
    pub fn parse(text: &str) -> CliResult<Self> {
        let text = text.trim();
        remember_secrets(text);
        let bad = |why: &str| CliError::new(format!("invalid store URL {}: {why}", Redacted(text)));
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(bad(
                "expected sqlite://PATH, postgres://..., or dynamodb://?region=...",
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => {
                let (path, query) = split_query(rest);
                let mut params = Params::parse(query, &["prefix"]).map_err(|e| bad(&e))?;
                if path.is_empty() {
                    return Err(bad(
                        "the file path is missing (sqlite://app.db, sqlite:///abs/app.db)",
                    ));
                }
                Ok(StoreLocation::Sqlite {
                    path: PathBuf::from(path),
                    prefix: params.take("prefix"),
                })
            }
            "postgres" | "postgresql" => {
                let mut url = Url::parse(text).map_err(|e| bad(&e.to_string()))?;
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(bad("the host is missing"));
                }
                let mut schema = None;
                let mut prefix = None;
                let kept: Vec<(String, String)> = url
                    .query_pairs()
                    .filter_map(|(k, v)| match k.as_ref() {
                        "schema" => {
                            schema = Some(v.into_owned());
                            None
                        }
                        "prefix" => {
                            prefix = Some(v.into_owned());
                            None
                        }
                        _ => Some((k.into_owned(), v.into_owned())),
                    })
                    .collect();
                if kept.is_empty() {
                    url.set_query(None);
                } else {
                    url.query_pairs_mut().clear().extend_pairs(kept);
                }
                Ok(StoreLocation::Postgres {
                    url: url.into(),
                    schema,
                    prefix,
                })
            }
            "dynamodb" => {
                let (host, query) = split_query(rest);
                if !host.is_empty() && host != "/" {
                    return Err(bad(
                        "put everything in the query: dynamodb://?region=R&endpoint=URL&prefix=P",
                    ));
                }
                let mut params =
                    Params::parse(query, &["region", "endpoint", "prefix"]).map_err(|e| bad(&e))?;
                let endpoint = params.take("endpoint");
                if let Some(e) = &endpoint {
                    Url::parse(e).map_err(|err| bad(&format!("endpoint {e:?}: {err}")))?;
                }
                Ok(StoreLocation::DynamoDb {
                    region: params.take("region"),
                    endpoint,
                    prefix: params
                        .take("prefix")
                        .unwrap_or_else(|| DEFAULT_DYNAMODB_PREFIX.to_owned()),
                })
            }
            other => Err(bad(&format!(
                "unknown scheme {other:?}; expected sqlite, postgres or dynamodb"
            ))),
        }
    }

    /// The cargo feature that opens this location.
    pub fn feature(&self) -> &'static str {
        match self {
            StoreLocation::Sqlite { .. } => "sqlite",
            StoreLocation::Postgres { .. } => "postgres",
            StoreLocation::DynamoDb { .. } => "dynamodb",
        }
    }
}

impl fmt::Display for StoreLocation {
    /// The location as a URL, password redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite { path, prefix } => {
                write!(f, "sqlite://{}", path.display())?;
                if let Some(p) = prefix {
                    write!(f, "?prefix={p}")?;
                }
                Ok(())
            }
            StoreLocation::Postgres {
                url,
                schema,
                prefix,
            } => {
                write!(f, "{}", Redacted(url))?;
                let mut sep = if url.contains('?') { '&' } else { '?' };
                for (k, v) in [("schema", schema), ("prefix", prefix)] {
                    if let Some(v) = v {
                        write!(f, "{sep}{k}={v}")?;
                        sep = '&';
                    }
                }
                Ok(())
            }
            StoreLocation::DynamoDb {
                region,
                endpoint,
                prefix,
            } => {
                write!(f, "dynamodb://?prefix={prefix}")?;
                if let Some(r) = region {
                    write!(f, "&region={r}")?;
                }
                if let Some(e) = endpoint {
                    write!(f, "&endpoint={}", Redacted(e))?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreLocation({self})")
    }
}

impl TransportLocation {
    /// Parse a transport URL; the error names the problem and shows the URL redacted.
    pub fn parse(text: &str) -> CliResult<Self> {
        let text = text.trim();
        remember_secrets(text);
        let bad =
            |why: &str| CliError::new(format!("invalid transport URL {}: {why}", Redacted(text)));
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(bad("expected kafka://host:port,... or amqp://..."));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "kafka" => {
                let (hosts, query) = split_query(rest);
                Params::parse(query, &[]).map_err(|e| bad(&e))?;
                let hosts = hosts.trim_end_matches('/');
                if hosts.is_empty() {
                    return Err(bad("no broker given (kafka://host:port,host:port)"));
                }
                for h in hosts.split(',') {
                    if h.contains('@') {
                        // Never quote it: what precedes `@` may be a password.
                        return Err(bad("a kafka:// URL carries no user or password (set SASL \
                             credentials with the OUTBOX_KAFKA_* settings)"));
                    }
                    if h.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(bad(
                            "a broker address contains a space or control character",
                        ));
                    }
                    let port_ok = h.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && port.parse::<u16>().is_ok()
                    });
                    if !port_ok {
                        return Err(bad(&format!(
                            "broker {h:?} is not host:port (kafka://host:port,host:port)"
                        )));
                    }
                }
                Ok(TransportLocation::Kafka {
                    brokers: hosts.to_owned(),
                })
            }
            "amqp" | "amqps" => {
                let mut url = Url::parse(text).map_err(|e| bad(&e.to_string()))?;
                let mut exchange = String::new();
                let kept: Vec<(String, String)> = url
                    .query_pairs()
                    .filter_map(|(k, v)| {
                        if k == "exchange" {
                            exchange = v.into_owned();
                            None
                        } else {
                            Some((k.into_owned(), v.into_owned()))
                        }
                    })
                    .collect();
                if kept.is_empty() {
                    url.set_query(None);
                } else {
                    url.query_pairs_mut().clear().extend_pairs(kept);
                }
                Ok(TransportLocation::Amqp {
                    url: url.into(),
                    exchange,
                })
            }
            other => Err(bad(&format!(
                "unknown scheme {other:?}; expected kafka, amqp or amqps"
            ))),
        }
    }

    /// The cargo feature that opens this location.
    pub fn feature(&self) -> &'static str {
        match self {
            TransportLocation::Kafka { .. } => "kafka",
            TransportLocation::Amqp { .. } => "rabbitmq",
        }
    }
}

impl fmt::Display for TransportLocation {
    /// The location as a URL, password redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportLocation::Kafka { brokers } => write!(f, "kafka://{brokers}"),
            TransportLocation::Amqp { url, exchange } => {
                write!(f, "{}", Redacted(url))?;
                if !exchange.is_empty() {
                    let sep = if url.contains('?') { '&' } else { '?' };
                    write!(f, "{sep}exchange={exchange}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for TransportLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransportLocation({self})")
    }
}

/// Split `rest` of a URL at its `?`.
fn split_query(rest: &str) -> (&str, &str) {
    rest.split_once('?').unwrap_or((rest, ""))
}

/// Query parameters of the schemes we parse by hand: only `allowed` names, each once.
struct Params(BTreeMap<String, String>);

impl Params {
    fn parse(query: &str, allowed: &[&str]) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            if !allowed.contains(&k.as_ref()) {
                return Err(if allowed.is_empty() {
                    format!("unknown parameter {k:?} (this scheme takes none)")
                } else {
                    format!("unknown parameter {k:?}; expected {}", allowed.join(", "))
                });
            }
            if v.is_empty() {
                return Err(format!("parameter {k:?} is empty"));
            }
            if map.insert(k.clone().into_owned(), v.into_owned()).is_some() {
                return Err(format!("parameter {k:?} is given twice"));
            }
        }
        Ok(Params(map))
    }

    fn take(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }
}

/// Displays a URL with the password of its userinfo and any `password=` parameter as `***`.
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&scrub(self.0))
    }
}

/// Characters that end the authority of a URL quoted inside a longer text.
const AUTHORITY_END: [char; 8] = ['/', '?', '#', ' ', '"', '\'', '\n', '\t'];

/// Replace, anywhere in `text`, the password of every `scheme://user:password@host` and the
/// value of every `password=` parameter with `***`.
fn redact_urls(text: &str) -> String {
    let mut out = text.to_owned();
    let mut from = 0;
    while let Some(pos) = out[from..].find("://") {
        let start = from + pos + 3;
        let end = out[start..]
            .find(AUTHORITY_END)
            .map_or(out.len(), |i| start + i);
        from = end;
        if let Some(at) = out[start..end].rfind('@')
            && let Some(colon) = out[start..start + at].find(':')
        {
            let password = start + colon + 1..start + at;
            from = end - password.len() + 3;
            out.replace_range(password, "***");
        }
    }
    let mut from = 0;
    while let Some(pos) = out[from..].find("password=") {
        let value = from + pos + "password=".len();
        let end = out[value..]
            .find(['&', '#', ' ', '"', '\n'])
            .map_or(out.len(), |i| value + i);
        out.replace_range(value..end, "***");
        from = value + 3;
    }
    out
}

/// Shortest remembered secret that [`scrub`] also replaces where it appears outside a URL;
/// shorter ones would collide with ordinary words (a password `outbox` in "outbox tables").
pub const MIN_SCRUBBED_SECRET_LEN: usize = 8;

/// Passwords seen in a location (raw and percent-decoded) or in a secret setting, so
/// [`scrub`] can remove them from any text, including errors of the client libraries.
fn secrets() -> &'static Mutex<Vec<String>> {
    static SECRETS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    SECRETS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Remember a secret so that [`scrub`] removes it from everything printed (when it has at
/// least [`MIN_SCRUBBED_SECRET_LEN`] characters).
pub fn remember_secret(secret: &str) {
    let mut list = secrets().lock().unwrap_or_else(|e| e.into_inner());
    for s in [
        secret.to_owned(),
        url::form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
        percent_decode(secret),
    ] {
        if s.chars().count() >= MIN_SCRUBBED_SECRET_LEN && !list.contains(&s) {
            list.push(s);
        }
    }
    // Longest first, so a secret containing another is replaced whole.
    list.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Remember the passwords in a location URL (userinfo and `password=` parameters).
fn remember_secrets(text: &str) {
    if let Some((_, rest)) = text.split_once("://") {
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some((userinfo, _)) = authority.rsplit_once('@')
            && let Some((_, password)) = userinfo.split_once(':')
        {
            remember_secret(password);
        }
    }
    for part in text.split(['?', '&', ' ']) {
        if let Some(v) = part.strip_prefix("password=") {
            remember_secret(v.split('#').next().unwrap_or(v));
        }
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// `text` with URL passwords (see [`redact_urls`]) and every remembered secret replaced by
/// `***`. Everything the CLI prints to stderr goes through it.
pub fn scrub(text: &str) -> String {
    let mut out = redact_urls(text);
    let list = secrets().lock().unwrap_or_else(|e| e.into_inner());
    for s in list.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_stores() {
        assert_eq!(
            StoreLocation::parse("sqlite://app.db").unwrap(),
            StoreLocation::Sqlite {
                path: "app.db".into(),
                prefix: None
            }
        );
        assert_eq!(
            StoreLocation::parse("sqlite:///var/lib/app.db?prefix=x_").unwrap(),
            StoreLocation::Sqlite {
                path: "/var/lib/app.db".into(),
                prefix: Some("x_".into())
            }
        );
        assert_eq!(
            StoreLocation::parse("postgres://u:pw@db:5432/app?schema=s&sslmode=disable&prefix=p_")
                .unwrap(),
            StoreLocation::Postgres {
                url: "postgres://u:pw@db:5432/app?sslmode=disable".into(),
                schema: Some("s".into()),
                prefix: Some("p_".into())
            }
        );
        assert_eq!(
            StoreLocation::parse("dynamodb://?region=eu-west-1&endpoint=http://127.0.0.1:8000")
                .unwrap(),
            StoreLocation::DynamoDb {
                region: Some("eu-west-1".into()),
                endpoint: Some("http://127.0.0.1:8000".into()),
                prefix: DEFAULT_DYNAMODB_PREFIX.into()
            }
        );
    }

    #[test]
    fn rejects_bad_store_urls_with_a_reason() {
        for (bad, why) in [
            ("app.db", "expected sqlite://"),
            ("mysql://db/app", "unknown scheme \"mysql\""),
            ("sqlite://", "file path is missing"),
            ("sqlite://a.db?prefx=x", "unknown parameter \"prefx\""),
            ("sqlite://a.db?prefix=", "is empty"),
            ("dynamodb://table?region=x", "put everything in the query"),
            ("dynamodb://?endpoint=notaurl", "endpoint"),
            ("postgres://u:pw@:5432/app", "invalid store URL"),
        ] {
            let e = StoreLocation::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn kafka_userinfo_is_refused_without_echo() {
        // Found by the store_url fuzz target: `host` before the last `:` was taken whole, so
        // userinfo passed as part of a "host" and Display printed the password.
        let e = TransportLocation::parse("kafka://user:Pl4ntedS3cret@:9\0 :9").unwrap_err();
        assert!(!e.to_string().contains("Pl4ntedS3cret"), "{e}");
        assert!(e.to_string().contains("no user or password"), "{e}");
        let e = TransportLocation::parse("kafka://user:pw@k1:9092").unwrap_err();
        assert!(!e.to_string().contains("pw@"), "{e}");
        let e = TransportLocation::parse("kafka://k1 :9092").unwrap_err();
        assert!(e.to_string().contains("space or control"), "{e}");
        assert!(TransportLocation::parse("kafka://k1:9092,k2:9092").is_ok());
    }

    #[test]
    fn kafka_broker_errors_never_quote_userinfo() {
        // Found by the fuzz target store_url: the broker was quoted whole, password included.
        let e = TransportLocation::parse("kafka://user:Pl4ntedS3cret@\u{8}").unwrap_err();
        assert!(!e.to_string().contains("Pl4ntedS3cret"), "{e}");
        assert!(!format!("{e:?}").contains("Pl4ntedS3cret"), "{e:?}");
        assert!(e.to_string().contains("no user or password"), "{e}");
    }

    #[test]
    fn parses_transports() {
        assert_eq!(
            TransportLocation::parse("kafka://a:9092,b:9093").unwrap(),
            TransportLocation::Kafka {
                brokers: "a:9092,b:9093".into()
            }
        );
        assert_eq!(
            TransportLocation::parse("amqp://g:pw@h:5672/%2f?exchange=ex&heartbeat=10").unwrap(),
            TransportLocation::Amqp {
                url: "amqp://g:pw@h:5672/%2f?heartbeat=10".into(),
                exchange: "ex".into()
            }
        );
        for (bad, why) in [
            ("kafka://", "no broker"),
            ("kafka://a", "not host:port"),
            ("kafka://a:x", "not host:port"),
            ("kafka://a:1?acks=1", "unknown parameter"),
            ("nats://a:1", "unknown scheme"),
        ] {
            let e = TransportLocation::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn never_shows_a_password() {
        let url = "postgres://app:Sup3r%2Fsecret@db/app?password=other1&schema=s";
        let loc = StoreLocation::parse(url).unwrap();
        for text in [loc.to_string(), format!("{loc:?}")] {
            assert!(!text.contains("Sup3r"), "{text}");
            assert!(!text.contains("other1"), "{text}");
        }
        // The decoded form, as a client library might print it, is scrubbed too.
        assert_eq!(scrub("auth failed for Sup3r/secret"), "auth failed for ***");
        let e = StoreLocation::parse("mysql://u:hunter22@db/x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter22") && e.contains("u:***@db"), "{e}");
        // Short passwords are redacted inside URLs only, so ordinary words survive.
        let _ = StoreLocation::parse("postgres://outbox:outbox@db/outbox").unwrap();
        assert_eq!(
            scrub("the outbox tables at postgres://outbox:outbox@db/outbox and amqp://g:pw@h"),
            "the outbox tables at postgres://outbox:***@db/outbox and amqp://g:***@h"
        );
        let amqp = TransportLocation::parse("amqp://g:topsecret@h/%2f").unwrap();
        assert_eq!(amqp.to_string(), "amqp://g:***@h/%2f");
    }
}
