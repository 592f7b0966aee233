//! [`AmqpUrl`]: an AMQP connection string whose password never reaches logs.

use std::fmt;
use std::str::FromStr;

use lapin::uri::AMQPUri;
use outbox_core::{Error, Result};

/// An `amqp://` or `amqps://` URL, e.g. `amqp://user:secret@127.0.0.1:5672/%2f`.
///
/// `Debug` and `Display` print the password as `***`
/// (`amqp://user:***@127.0.0.1:5672/%2f`), so configs and errors can be logged safely.
/// [`expose`](Self::expose) gives the real URL to the client library.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    /// Validate `url` with the AMQP URI grammar (scheme, host, port, vhost, query options).
    ///
    /// # Errors
    /// [`ErrorKind::ConfigInvalid`](outbox_core::ErrorKind::ConfigInvalid) naming the
    /// (redacted) URL and what is wrong with it.
    pub fn parse(url: impl Into<String>) -> Result<Self> {
        let url = AmqpUrl(url.into());
        AMQPUri::from_str(&url.0)
            .map_err(|e| Error::config(format!("invalid AMQP URL {url}: {e}")))?;
        Ok(url)
    }

    /// The URL with its password, for the AMQP client. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

impl FromStr for AmqpUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        AmqpUrl::parse(s)
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({:?})", self.redacted())
    }
}

/// Replace the password of the userinfo part (`user:password@`) with `***`.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..rest_start],
        &userinfo[..colon],
        &url[rest_start + at..]
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn password_is_redacted_everywhere() {
        let u = AmqpUrl::parse("amqp://guest:s3cr%40t@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(u.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert!(!format!("{u:?}").contains("s3cr"));
        assert_eq!(u.expose(), "amqp://guest:s3cr%40t@127.0.0.1:5672/%2f");
        let no_pw = AmqpUrl::parse("amqp://127.0.0.1:5672").unwrap();
        assert_eq!(no_pw.to_string(), "amqp://127.0.0.1:5672");
        let user_only = AmqpUrl::parse("amqp://guest@localhost/vh").unwrap();
        assert_eq!(user_only.to_string(), "amqp://guest@localhost/vh");
    }

    #[test]
    fn invalid_url_is_config_error_without_password() {
        let e = AmqpUrl::parse("http://user:topsecret@host").unwrap_err();
        assert_eq!(e.kind(), outbox_core::ErrorKind::ConfigInvalid);
        assert!(!e.to_string().contains("topsecret"), "{e}");
    }
}
