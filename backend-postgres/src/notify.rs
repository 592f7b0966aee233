//! Optional wake-up by `LISTEN/NOTIFY`: [`PgStore::listen`].

use std::time::Duration;

use outbox_core::{CancellationToken, RelayHandle, Result};
use sqlx::postgres::PgListener;

use crate::error::parse_error_with;
use crate::schema::fnv64;
use crate::store::PgStore;

/// The notification channel of one outbox: `{schema}.{prefix}messages`, or a hash of it when
/// that is longer than PostgreSQL's 63-byte identifiers.
pub(crate) fn channel_name(schema: &str, prefix: &str) -> String {
    let name = format!("{schema}.{prefix}messages");
    if name.len() <= 63 {
        name
    } else {
        format!("outbox_{:016x}", fnv64(&name))
    }
}

impl PgStore {
    /// Wake `relay` whenever a transaction that added messages to this outbox commits, from
    /// any process, by `LISTEN`ing on [`notify_channel`](Self::notify_channel). Needs
    /// [`PgConfig::with_notify`](crate::PgConfig::with_notify) on the writers' stores.
    ///
    /// Returns once the `LISTEN` is in place; the returned task runs until `shutdown` is
    /// cancelled. It holds one dedicated connection (not from the pool's budget of idle
    /// connections: sqlx's listener takes one connection out of the pool for good). If the
    /// connection drops it reconnects and wakes the relay once, since notifications sent
    /// meanwhile are lost; the relay's polling remains the safety net in every case.
    ///
    /// # Errors
    /// `Unavailable` if the listening connection cannot be opened.
    pub async fn listen(
        &self,
        relay: RelayHandle,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let channel = self.notify_channel().to_owned();
        let mut listener = PgListener::connect_with(self.pool())
            .await
            .map_err(|e| parse_error_with(e, "opening the LISTEN connection"))?;
        listener
            .listen(&channel)
            .await
            .map_err(|e| parse_error_with(e, format_args!("LISTEN {channel:?}")))?;
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    received = listener.try_recv() => match received {
                        Ok(Some(_)) => relay.wake(),
                        // The connection was lost; the next call reconnects. Anything
                        // committed meanwhile was not announced: sweep once.
                        Ok(None) => relay.wake(),
                        Err(e) => {
                            tracing::warn!(error = %e, channel = %channel, "outbox LISTEN failed; retrying");
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    },
                }
            }
        }))
    }
}
