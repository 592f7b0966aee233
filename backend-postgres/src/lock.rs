//! [`PgLock`]: leases with fencing tokens in the `{prefix}leases` table.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::rules::{
    check_lease, check_lease_names, check_lease_ttl, check_name, lease_lost, lease_token,
    signed_token,
};
use outbox_core::{
    DateTime, DistributedLock, Error, Lease, Result, Utc, add_duration, async_trait,
};
use sqlx::Row;
use sqlx::postgres::types::PgInterval;

use crate::core::{Core, LockClock, q};
use crate::error::parse_error_with;

/// Leases on named resources, in the same database as the outbox.
///
/// Get one with [`PgStore::lock`](crate::PgStore::lock); clones share the pool. Every
/// operation is one statement (an `INSERT .. ON CONFLICT DO UPDATE .. WHERE` for acquire), so
/// concurrent acquirers are serialised on the resource's row and exactly one wins; acquirers of
/// different resources never wait for each other.
///
/// **Clock.** With [`LockClock::Database`] (the default) expiry is judged by the server's
/// `now()`, the same clock for every contender, so client clock skew does not matter. The
/// `expires_at` it returns is on the caller's clock: the caller's time just before the request
/// plus the remaining lifetime the server reported, which is never later than the real expiry.
/// With [`LockClock::Store`] expiry follows the store's configured clock (tests).
///
/// **Fencing tokens** only grow: a new holder (take-over, or acquire after release or
/// expiry) gets `token + 1`; rows are never deleted, so a token is never issued twice.
#[derive(Clone)]
pub struct PgLock {
    pub(crate) core: Arc<Core>,
}

impl fmt::Debug for PgLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgLock").field("store", &self.core).finish()
    }
}

fn interval(ttl: Duration) -> Result<PgInterval> {
    check_lease_ttl(ttl)?;
    let microseconds = i64::try_from(ttl.as_micros())
        .ok()
        .filter(|us| *us > 0)
        .ok_or_else(|| {
            Error::invalid_input(format!(
                "lease ttl {ttl:?} must be at least one microsecond and fit in an interval"
            ))
        })?;
    Ok(PgInterval {
        months: 0,
        days: 0,
        microseconds,
    })
}

impl PgLock {
    /// The store clock's time with [`LockClock::Store`]; `None` (the SQL uses `now()`) with
    /// [`LockClock::Database`].
    fn bind_now(&self) -> Option<DateTime<Utc>> {
        match self.core.lock_clock {
            LockClock::Store => Some(self.core.clock.now()),
            LockClock::Database => None,
        }
    }

    /// The expiry to report: the stored one with the store clock; with the database clock,
    /// the caller's time before the request plus the remaining lifetime the server saw.
    fn reported_expiry(
        &self,
        local_before: DateTime<Utc>,
        stored: DateTime<Utc>,
        db_now: DateTime<Utc>,
    ) -> DateTime<Utc> {
        match self.core.lock_clock {
            LockClock::Store => stored,
            LockClock::Database => {
                let remaining = (stored - db_now).to_std().unwrap_or(Duration::ZERO);
                add_duration(local_before, remaining)
            }
        }
    }

    async fn why_lost(&self, lease: &Lease) -> Error {
        let row = sqlx::query(q(&self.core.sql.lease_get))
            .bind(&lease.resource)
            .fetch_optional(&self.core.pool)
            .await;
        let why = match row {
            Ok(None) => "the resource was never leased".to_owned(),
            Ok(Some(row)) => match (
                row.try_get::<Option<String>, _>("owner"),
                row.try_get::<i64, _>("token"),
            ) {
                (Ok(None), _) => "it was released".to_owned(),
                (Ok(Some(owner)), Ok(t)) => format!("{owner:?} holds it now with token {t}"),
                _ => "it is held by someone else".to_owned(),
            },
            Err(_) => "it is not held with this owner and token".to_owned(),
        };
        lease_lost(lease, &why)
    }
}

#[async_trait]
impl DistributedLock for PgLock {
    async fn acquire(&self, resource: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        check_lease_names(resource, owner)?;
        let ttl_interval = interval(ttl)?;
        let ctx = |e| parse_error_with(e, format_args!("acquiring the lease on {resource:?}"));
        let local_before = self.core.clock.now();
        let row = sqlx::query(q(&self.core.sql.lease_acquire))
            .bind(resource)
            .bind(owner)
            .bind(ttl_interval)
            .bind(self.bind_now())
            .fetch_optional(&self.core.pool)
            .await
            .map_err(ctx)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let token: i64 = row.try_get("token").map_err(ctx)?;
        let expires: DateTime<Utc> = row.try_get("expires_at").map_err(ctx)?;
        let db_now: DateTime<Utc> = row.try_get("db_now").map_err(ctx)?;
        Ok(Some(Lease {
            resource: resource.to_owned(),
            owner: owner.to_owned(),
            token: lease_token(token)?,
            expires_at: self.reported_expiry(local_before, expires, db_now),
        }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        check_lease(lease)?;
        let ttl_interval = interval(ttl)?;
        let token = signed_token(lease)?;
        let ctx = |e| {
            parse_error_with(
                e,
                format_args!("renewing the lease on {:?}", lease.resource),
            )
        };
        let local_before = self.core.clock.now();
        let row = sqlx::query(q(&self.core.sql.lease_renew))
            .bind(&lease.resource)
            .bind(&lease.owner)
            .bind(token)
            .bind(ttl_interval)
            .bind(self.bind_now())
            .fetch_optional(&self.core.pool)
            .await
            .map_err(ctx)?;
        let Some(row) = row else {
            return Err(self.why_lost(lease).await);
        };
        let expires: DateTime<Utc> = row.try_get("expires_at").map_err(ctx)?;
        let db_now: DateTime<Utc> = row.try_get("db_now").map_err(ctx)?;
        Ok(Lease {
            expires_at: self.reported_expiry(local_before, expires, db_now),
            ..lease.clone()
        })
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        check_lease(lease)?;
        let token = signed_token(lease)?;
        let done = sqlx::query(q(&self.core.sql.lease_release))
            .bind(&lease.resource)
            .bind(&lease.owner)
            .bind(token)
            .execute(&self.core.pool)
            .await
            .map_err(|e| {
                parse_error_with(
                    e,
                    format_args!("releasing the lease on {:?}", lease.resource),
                )
            })?;
        if done.rows_affected() == 0 {
            return Err(self.why_lost(lease).await);
        }
        Ok(())
    }

    async fn current(&self, resource: &str) -> Result<Option<Lease>> {
        check_name("lease resource", resource)?;
        let ctx = |e| parse_error_with(e, format_args!("reading the lease on {resource:?}"));
        let local_before = self.core.clock.now();
        let row = sqlx::query(q(&self.core.sql.lease_current))
            .bind(resource)
            .bind(self.bind_now())
            .fetch_optional(&self.core.pool)
            .await
            .map_err(ctx)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let owner: String = row.try_get("owner").map_err(ctx)?;
        let token: i64 = row.try_get("token").map_err(ctx)?;
        let expires: DateTime<Utc> = row.try_get("expires_at").map_err(ctx)?;
        let db_now: DateTime<Utc> = row.try_get("db_now").map_err(ctx)?;
        Ok(Some(Lease {
            resource: resource.to_owned(),
            owner,
            token: lease_token(token)?,
            expires_at: self.reported_expiry(local_before, expires, db_now),
        }))
    }
}
