//! Optional wake-up by `LISTEN/NOTIFY`: the channel name and the listening task behind
//! [`PgStore::listen`](crate::PgStore::listen).

use std::time::Duration;

use outbox_core::{CancellationToken, RelayHandle, Result};
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use crate::error::parse_error_with;
use crate::schema::fnv64;

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

/// Wake `relay` on every notification on `channel`, from a dedicated connection of `pool`,
/// until `shutdown` is cancelled: the body of [`PgStore::listen`](crate::PgStore::listen).
pub(crate) async fn listen(
    pool: &PgPool,
    channel: String,
    relay: RelayHandle,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut listener = PgListener::connect_with(pool)
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
