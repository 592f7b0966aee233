//! [`KafkaConfig`]: librdkafka settings, passed through unchanged, from code or the environment.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use outbox_core::{Error, Result};
use rdkafka::ClientConfig;

/// The default prefix of environment variables read by [`KafkaConfig::from_env`].
pub const ENV_PREFIX: &str = "OUTBOX_KAFKA_";

/// Default [`KafkaConfig::with_send_queue_timeout`]: 2 s.
pub const DEFAULT_SEND_QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Client settings shared by [`KafkaProducer`](crate::KafkaProducer),
/// [`KafkaConsumer`](crate::KafkaConsumer) and [`create_topics`](crate::create_topics).
///
/// Every entry is a librdkafka property (`bootstrap.servers`, `security.protocol`,
/// `sasl.mechanism`, `sasl.username`, `sasl.password`, `ssl.ca.location`,
/// `message.max.bytes`, `session.timeout.ms`, ...) handed to librdkafka unchanged; librdkafka
/// validates them when a client is built (an unknown key or bad value is a `ConfigInvalid`
/// error naming it). The few settings this crate fixes for its guarantees are listed on the
/// producer and consumer.
///
/// `Debug` redacts secrets: the value of every key containing `password`, `secret`, `.pem`,
/// `oauthbearer.config` or `keystore` is shown as `***`.
///
/// ```
/// use outbox_kafka::KafkaConfig;
/// let config = KafkaConfig::new("broker-1:9092,broker-2:9092")
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanism", "SCRAM-SHA-512")
///     .set("sasl.username", "svc")
///     .set("sasl.password", "hunter2");
/// assert!(!format!("{config:?}").contains("hunter2"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    settings: BTreeMap<String, String>,
    send_queue_timeout: Duration,
}

impl KafkaConfig {
    /// Settings with `bootstrap.servers` set to `bootstrap_servers` (comma-separated
    /// `host:port` list).
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        KafkaConfig {
            settings: BTreeMap::new(),
            send_queue_timeout: DEFAULT_SEND_QUEUE_TIMEOUT,
        }
        .set("bootstrap.servers", bootstrap_servers)
    }

    /// Settings from the environment variables starting with [`ENV_PREFIX`]
    /// (`OUTBOX_KAFKA_`); see [`from_env_vars`](Self::from_env_vars) for the mapping.
    ///
    /// # Errors
    /// `ConfigInvalid` if `OUTBOX_KAFKA_BOOTSTRAP_SERVERS` is missing, or a variable with the
    /// prefix is not valid UTF-8.
    pub fn from_env() -> Result<Self> {
        Self::from_env_prefix(ENV_PREFIX)
    }

    /// Like [`from_env`](Self::from_env) with another prefix (e.g. `BILLING_KAFKA_`).
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_env_prefix(prefix: &str) -> Result<Self> {
        let mut vars = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(prefix) {
                continue;
            }
            let value = value.into_string().map_err(|_| {
                Error::config(format!("environment variable {name} is not valid UTF-8"))
            })?;
            vars.push((name.to_owned(), value));
        }
        Self::from_env_vars(prefix, vars)
    }

    /// Settings from `(name, value)` pairs shaped like environment variables: each name
    /// starting with `prefix` becomes a librdkafka key by dropping the prefix, lower-casing and
    /// turning `_` into `.`: `OUTBOX_KAFKA_SASL_PASSWORD=...` sets `sasl.password`,
    /// `OUTBOX_KAFKA_BOOTSTRAP_SERVERS=...` sets `bootstrap.servers`. Other names are ignored.
    ///
    /// ```
    /// use outbox_kafka::KafkaConfig;
    /// let config = KafkaConfig::from_env_vars("OUTBOX_KAFKA_", [
    ///     ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS".to_owned(), "k1:9092".to_owned()),
    ///     ("OUTBOX_KAFKA_SECURITY_PROTOCOL".to_owned(), "SSL".to_owned()),
    ///     ("HOME".to_owned(), "/root".to_owned()),
    /// ]).unwrap();
    /// assert_eq!(config.get("security.protocol"), Some("SSL"));
    /// ```
    ///
    /// # Errors
    /// `ConfigInvalid` if no `<prefix>BOOTSTRAP_SERVERS` is among them.
    pub fn from_env_vars(
        prefix: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let mut settings = BTreeMap::new();
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix(prefix) else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            settings.insert(rest.to_ascii_lowercase().replace('_', "."), value);
        }
        if !settings.contains_key("bootstrap.servers") {
            return Err(Error::config(format!(
                "{prefix}BOOTSTRAP_SERVERS is not set (the Kafka brokers, host:port,...)"
            )));
        }
        Ok(KafkaConfig {
            settings,
            send_queue_timeout: DEFAULT_SEND_QUEUE_TIMEOUT,
        })
    }

    /// Set any librdkafka property (replacing an earlier value).
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.insert(key.into(), value.into());
        self
    }

    /// The value of a property set on this config (not librdkafka's defaults).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings.get(key).map(String::as_str)
    }

    /// How long a send (or a whole `send_ordered` chain) waits for room in librdkafka's local
    /// queue (`queue.buffering.max.messages`) before failing with a retryable error. Default
    /// [`DEFAULT_SEND_QUEUE_TIMEOUT`]. It counts towards the producer's
    /// [`delivery_timeout`](outbox_core::Producer::delivery_timeout).
    pub fn with_send_queue_timeout(mut self, timeout: Duration) -> Self {
        self.send_queue_timeout = timeout;
        self
    }

    pub(crate) fn send_queue_timeout(&self) -> Duration {
        self.send_queue_timeout
    }

    /// The producer's `message.max.bytes` (librdkafka's default 1,000,000 when unset).
    ///
    /// # Errors
    /// `ConfigInvalid` if it is set but not a number.
    pub fn message_max_bytes(&self) -> Result<usize> {
        match self.get("message.max.bytes") {
            None => Ok(DEFAULT_MESSAGE_MAX_BYTES),
            Some(v) => v.trim().parse().map_err(|_| {
                Error::config(format!(
                    "message.max.bytes must be a number of bytes, got {v:?}"
                ))
            }),
        }
    }

    /// The settings as an rdkafka [`ClientConfig`], with `overrides` applied on top.
    /// The settings as an rdkafka [`ClientConfig`], for building other rdkafka clients (an
    /// admin client, a plain consumer reading a dead-letter topic) with the same connection
    /// and security settings.
    pub fn to_client_config(&self) -> ClientConfig {
        self.client_config(&[])
    }

    pub(crate) fn client_config(&self, overrides: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.settings {
            c.set(k, v);
        }
        for (k, v) in overrides {
            c.set(*k, *v);
        }
        c
    }
}

/// Whether the value of `key` is a secret that must not be printed.
pub(crate) fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        ".pem",
        "oauthbearer.config",
        "keystore",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Settings<'a>(&'a BTreeMap<String, String>);
        impl fmt::Debug for Settings<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|(k, v)| {
                        let v: &str = if is_secret(k) { "***" } else { v };
                        (k, v)
                    }))
                    .finish()
            }
        }
        f.debug_struct("KafkaConfig")
            .field("settings", &Settings(&self.settings))
            .field("send_queue_timeout", &self.send_queue_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_vars_map_to_dotted_keys() {
        let c = KafkaConfig::from_env_vars(
            "OUTBOX_KAFKA_",
            [
                ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS".into(), "a:1".into()),
                ("OUTBOX_KAFKA_SASL_PASSWORD".into(), "pw".into()),
                ("OUTBOX_KAFKA_".into(), "ignored".into()),
                ("OTHER".into(), "x".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.get("bootstrap.servers"), Some("a:1"));
        assert_eq!(c.get("sasl.password"), Some("pw"));
        assert_eq!(c.settings.len(), 2);
        let e = KafkaConfig::from_env_vars("P_", [("P_ACKS".into(), "all".into())]).unwrap_err();
        assert!(e.to_string().contains("P_BOOTSTRAP_SERVERS"), "{e}");
    }

    #[test]
    fn debug_redacts_secrets() {
        let c = KafkaConfig::new("b:9092")
            .set("sasl.password", "p1")
            .set("ssl.key.password", "p2")
            .set("sasl.oauthbearer.client.secret", "p3")
            .set("ssl.key.pem", "p4")
            .set("sasl.username", "user");
        let s = format!("{c:?}");
        for secret in ["p1", "p2", "p3", "p4"] {
            assert!(!s.contains(secret), "{s}");
        }
        assert!(s.contains("user") && s.contains("b:9092"), "{s}");
    }

    #[test]
    fn message_max_bytes_parses() {
        assert_eq!(
            KafkaConfig::new("b").message_max_bytes().unwrap(),
            1_000_000
        );
        let c = KafkaConfig::new("b").set("message.max.bytes", "65536");
        assert_eq!(c.message_max_bytes().unwrap(), 65536);
        let c = KafkaConfig::new("b").set("message.max.bytes", "lots");
        assert!(c.message_max_bytes().is_err());
    }
}
