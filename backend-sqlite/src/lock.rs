//! [`SqliteLock`]: leases with fencing tokens in the `{prefix}leases` table.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::rules::{
    check_lease, check_lease_names, check_lease_ttl, check_name, lease_lost, lease_token,
    signed_token,
};
use outbox_core::{
    DateTime, DistributedLock, Error, Lease, Result, Utc, add_duration, async_trait,
    truncate_micros,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::codec::{from_micros, to_micros};
use crate::core::Core;
use crate::error::parse_error_with;
use crate::ops::{read, write};

/// Leases on named resources, stored in the same SQLite file as the outbox.
///
/// Get one with [`SqliteStore::lock`](crate::SqliteStore::lock); clones share the pool.
/// Every operation is one `BEGIN IMMEDIATE` transaction, so concurrent acquirers (tasks,
/// processes) are serialised and exactly one wins a free resource.
///
/// Expiry is judged by the store's clock. All holders and contenders of a resource must use
/// clocks that agree within a margin much smaller than the lease TTL (on one machine they
/// share the system clock); a holder must stop acting on a resource once `renew` fails with
/// `LeaseLost`, and pass the fencing token downstream.
#[derive(Clone)]
pub struct SqliteLock {
    pub(crate) core: Arc<Core>,
}

impl fmt::Debug for SqliteLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteLock")
            .field("store", &self.core)
            .finish()
    }
}

/// A lease row: owner (`None` when released), token, expiry in microseconds.
type Row = (Option<String>, i64, i64);

fn get_row(conn: &Connection, core: &Core, resource: &str) -> Result<Option<Row>> {
    let ctx = |e| parse_error_with(e, format_args!("reading the lease on {resource:?}"));
    conn.prepare_cached(&core.sql.lease_get)
        .map_err(ctx)?
        .query_row([resource], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()
        .map_err(ctx)
}

/// Check that `lease` is the current holder's (owner and token); the stored expiry is not
/// checked: a lapsed lease nobody took over is still held.
fn check_holder(conn: &Connection, core: &Core, lease: &Lease) -> Result<i64> {
    let token = signed_token(lease)?;
    match get_row(conn, core, &lease.resource)? {
        None => Err(lease_lost(lease, "the resource was never leased")),
        Some((None, _, _)) => Err(lease_lost(lease, "it was released")),
        Some((Some(owner), t, _)) if owner == lease.owner && t == token => Ok(token),
        Some((Some(owner), t, _)) => Err(lease_lost(
            lease,
            &format!("{owner:?} holds it now with token {t}"),
        )),
    }
}

#[async_trait]
impl DistributedLock for SqliteLock {
    async fn acquire(&self, resource: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        check_lease_names(resource, owner)?;
        check_lease_ttl(ttl)?;
        let now = self.core.clock.now();
        let expires = truncate_micros(add_duration(now, ttl));
        let (resource, owner) = (resource.to_owned(), owner.to_owned());
        let core = self.core.clone();
        self.core
            .pool
            .run(move |conn| {
                write(conn, |c| {
                    let ctx = |e| {
                        parse_error_with(e, format_args!("acquiring the lease on {resource:?}"))
                    };
                    let now_us = to_micros(now);
                    let token = match get_row(c, &core, &resource)? {
                        None => {
                            c.prepare_cached(&core.sql.lease_insert)
                                .map_err(ctx)?
                                .execute(params![resource, owner, 1_i64, to_micros(expires)])
                                .map_err(ctx)?;
                            1
                        }
                        Some((Some(holder), token, exp)) if exp > now_us => {
                            if holder != owner {
                                return Ok(None);
                            }
                            // The holder acquiring again: a renew, same token.
                            c.prepare_cached(&core.sql.lease_extend)
                                .map_err(ctx)?
                                .execute(params![resource, owner, token, to_micros(expires)])
                                .map_err(ctx)?;
                            token
                        }
                        // Free, released or expired: take over with a greater token.
                        Some((_, token, _)) => {
                            let next = token.checked_add(1).ok_or_else(|| {
                                Error::unexpected(format!(
                                    "fencing token of {resource:?} is exhausted"
                                ))
                            })?;
                            c.prepare_cached(&core.sql.lease_take)
                                .map_err(ctx)?
                                .execute(params![resource, owner, next, to_micros(expires)])
                                .map_err(ctx)?;
                            next
                        }
                    };
                    Ok(Some(Lease {
                        resource: resource.clone(),
                        owner: owner.clone(),
                        token: lease_token(token)?,
                        expires_at: expires,
                    }))
                })
            })
            .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        check_lease(lease)?;
        check_lease_ttl(ttl)?;
        let now = self.core.clock.now();
        let expires = truncate_micros(add_duration(now, ttl));
        let lease = lease.clone();
        let core = self.core.clone();
        self.core
            .pool
            .run(move |conn| {
                write(conn, |c| {
                    let token = check_holder(c, &core, &lease)?;
                    c.prepare_cached(&core.sql.lease_extend)
                        .and_then(|mut s| {
                            s.execute(params![
                                lease.resource,
                                lease.owner,
                                token,
                                to_micros(expires)
                            ])
                        })
                        .map_err(|e| {
                            parse_error_with(
                                e,
                                format_args!("renewing the lease on {:?}", lease.resource),
                            )
                        })?;
                    Ok(Lease {
                        expires_at: expires,
                        ..lease
                    })
                })
            })
            .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        check_lease(lease)?;
        let lease = lease.clone();
        let core = self.core.clone();
        self.core
            .pool
            .run(move |conn| {
                write(conn, |c| {
                    let token = check_holder(c, &core, &lease)?;
                    c.prepare_cached(&core.sql.lease_release)
                        .and_then(|mut s| s.execute(params![lease.resource, lease.owner, token]))
                        .map_err(|e| {
                            parse_error_with(
                                e,
                                format_args!("releasing the lease on {:?}", lease.resource),
                            )
                        })?;
                    Ok(())
                })
            })
            .await
    }

    async fn current(&self, resource: &str) -> Result<Option<Lease>> {
        check_name("lease resource", resource)?;
        let now = to_micros(self.core.clock.now());
        let resource = resource.to_owned();
        let core = self.core.clone();
        self.core
            .pool
            .run(move |conn| {
                read(conn, |c| match get_row(c, &core, &resource)? {
                    Some((Some(owner), token, exp)) if exp > now => Ok(Some(Lease {
                        resource: resource.clone(),
                        owner,
                        token: lease_token(token)?,
                        expires_at: expiry(exp)?,
                    })),
                    _ => Ok(None),
                })
            })
            .await
    }
}

fn expiry(micros: i64) -> Result<DateTime<Utc>> {
    from_micros("lease expires_at", micros)
}
