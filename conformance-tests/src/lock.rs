//! Distributed lock cases: contract items 1–4 ("Distributed lock" in DESIGN.md) and the
//! `# Behavior` sections of [`DistributedLock`].

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{Clock, DistributedLock, ErrorKind, Lease, TransactionalStore, add_duration};

use crate::harness::Fixture;
use crate::support::{assert_kind, bad_names, longest_name, ok};

const TTL: Duration = Duration::from_secs(10);

async fn acquire(
    lock: &dyn DistributedLock,
    resource: &str,
    owner: &str,
    ttl: Duration,
) -> Option<Lease> {
    ok(
        lock.acquire(resource, owner, ttl).await,
        &format!("acquire({resource}, {owner})"),
    )
}

async fn must_acquire(
    lock: &dyn DistributedLock,
    resource: &str,
    owner: &str,
    ttl: Duration,
) -> Lease {
    acquire(lock, resource, owner, ttl)
        .await
        .unwrap_or_else(|| panic!("{owner} should get the free resource {resource}"))
}

async fn current(lock: &dyn DistributedLock, resource: &str) -> Option<Lease> {
    ok(
        lock.current(resource).await,
        &format!("current({resource})"),
    )
}

/// Item 1: the first acquire gets a lease (resource, owner, `expires_at = now + ttl`); another
/// owner gets `None` while it is held; `current` shows it; the holder re-acquiring renews with
/// the same token; other resources are independent.
pub async fn single_holder<S: TransactionalStore>(f: &Fixture<S>) {
    let lock = &*f.lock;
    assert_eq!(
        current(lock, "shard-0").await,
        None,
        "a fresh resource is free"
    );
    let a = must_acquire(lock, "shard-0", "relay-a", TTL).await;
    assert_eq!(a.resource, "shard-0");
    assert_eq!(a.owner, "relay-a");
    assert_eq!(
        a.expires_at,
        add_duration(f.clock.now(), TTL),
        "expires_at = now + ttl"
    );
    assert_eq!(current(lock, "shard-0").await, Some(a.clone()));
    assert_eq!(
        acquire(lock, "shard-0", "relay-b", TTL).await,
        None,
        "held by another owner"
    );

    f.clock.advance(Duration::from_secs(3));
    let again = must_acquire(lock, "shard-0", "relay-a", TTL).await;
    assert_eq!(
        again.token, a.token,
        "re-acquire by the holder keeps the token"
    );
    assert_eq!(
        again.expires_at,
        add_duration(f.clock.now(), TTL),
        "re-acquire renews"
    );
    assert_eq!(current(lock, "shard-0").await, Some(again));

    let other = must_acquire(lock, "shard-1", "relay-b", TTL).await;
    assert_eq!(other.owner, "relay-b", "resources are independent");
    assert_eq!(acquire(lock, "shard-0", "relay-b", TTL).await, None);
}

/// Items 1 and 3: after release, `current` is `None` and another owner acquires at once with a
/// strictly greater token; a second release, or a renew of the released lease, fails with
/// `LeaseLost`.
pub async fn release_then_reacquire<S: TransactionalStore>(f: &Fixture<S>) {
    let lock = &*f.lock;
    let a = must_acquire(lock, "res", "owner-a", TTL).await;
    ok(lock.release(&a).await, "release");
    assert_eq!(
        current(lock, "res").await,
        None,
        "a released resource is free"
    );
    assert_kind(
        lock.release(&a).await,
        ErrorKind::LeaseLost,
        "second release",
    );
    assert_kind(
        lock.renew(&a, TTL).await,
        ErrorKind::LeaseLost,
        "renew after release",
    );
    let b = must_acquire(lock, "res", "owner-b", TTL).await;
    assert!(
        b.token > a.token,
        "new holder's token {} must exceed {}",
        b.token,
        a.token
    );
    ok(lock.release(&b).await, "release");
    let a2 = must_acquire(lock, "res", "owner-a", TTL).await;
    assert!(
        a2.token > b.token,
        "the same owner re-acquiring also gets a greater token"
    );
}

/// Items 1 and 3: another owner gets `None` until the lease expires (clock past the ttl), then
/// takes over with a strictly greater token; the old holder's renew and release fail with
/// `LeaseLost` and do not disturb the new holder.
pub async fn expiry_takeover<S: TransactionalStore>(f: &Fixture<S>) {
    let lock = &*f.lock;
    let a = must_acquire(lock, "res", "owner-a", TTL).await;
    f.clock.advance(TTL - Duration::from_secs(1));
    assert_eq!(
        acquire(lock, "res", "owner-b", TTL).await,
        None,
        "not expired yet"
    );
    assert_eq!(
        current(lock, "res").await.map(|l| l.owner),
        Some("owner-a".to_owned())
    );
    f.clock.advance(Duration::from_secs(2));
    assert_eq!(
        current(lock, "res").await,
        None,
        "an expired lease is not current"
    );
    let b = must_acquire(lock, "res", "owner-b", TTL).await;
    assert!(
        b.token > a.token,
        "takeover token {} must exceed {}",
        b.token,
        a.token
    );
    assert_kind(
        lock.renew(&a, TTL).await,
        ErrorKind::LeaseLost,
        "renew by the old holder",
    );
    assert_kind(
        lock.release(&a).await,
        ErrorKind::LeaseLost,
        "release by the old holder",
    );
    assert_eq!(
        current(lock, "res").await,
        Some(b.clone()),
        "the new holder is undisturbed"
    );
    assert_eq!(
        acquire(lock, "res", "owner-a", TTL).await,
        None,
        "the old holder cannot come back"
    );
}

/// Item 2: renew extends to `now + ttl` with the same token, so the lease is still held after
/// the original expiry; renewing an expired lease nobody took over succeeds.
pub async fn renew_extends<S: TransactionalStore>(f: &Fixture<S>) {
    let lock = &*f.lock;
    let a = must_acquire(lock, "res", "owner-a", TTL).await;
    f.clock.advance(Duration::from_secs(8));
    let renewed = ok(lock.renew(&a, TTL).await, "renew");
    assert_eq!(renewed.token, a.token, "renew keeps the token");
    assert_eq!(renewed.owner, a.owner);
    assert_eq!(renewed.resource, a.resource);
    assert_eq!(
        renewed.expires_at,
        add_duration(f.clock.now(), TTL),
        "renew extends to now + ttl"
    );
    f.clock.advance(Duration::from_secs(8));
    // 16 s after acquire: past the original expiry, within the renewed one.
    assert_eq!(
        acquire(lock, "res", "owner-b", TTL).await,
        None,
        "the renewed lease still holds"
    );
    assert_eq!(current(lock, "res").await, Some(renewed.clone()));

    f.clock.advance(TTL + Duration::from_secs(1));
    assert_eq!(current(lock, "res").await, None);
    let revived = ok(
        lock.renew(&renewed, TTL).await,
        "renew of an expired lease nobody took",
    );
    assert_eq!(revived.token, a.token);
    assert_eq!(current(lock, "res").await, Some(revived.clone()));
    assert_eq!(acquire(lock, "res", "owner-b", TTL).await, None);
    ok(lock.release(&revived).await, "release");
}

/// Item 2: renew and release by a non-holder (other owner, or the holder's name with a wrong
/// token) fail with `LeaseLost` and leave the holder's lease intact.
pub async fn non_holder_rejected<S: TransactionalStore>(f: &Fixture<S>) {
    let lock = &*f.lock;
    let a = must_acquire(lock, "res", "owner-a", TTL).await;
    let forged_owner = Lease {
        owner: "owner-b".to_owned(),
        ..a.clone()
    };
    let forged_token = Lease {
        token: a.token + 1,
        ..a.clone()
    };
    let other_resource = Lease {
        resource: "other".to_owned(),
        ..a.clone()
    };
    for (what, lease) in [
        ("another owner", &forged_owner),
        ("a wrong token", &forged_token),
        ("a resource never acquired", &other_resource),
    ] {
        assert_kind(
            lock.renew(lease, TTL).await,
            ErrorKind::LeaseLost,
            &format!("renew with {what}"),
        );
        assert_kind(
            lock.release(lease).await,
            ErrorKind::LeaseLost,
            &format!("release with {what}"),
        );
    }
    assert_eq!(
        current(lock, "res").await,
        Some(a.clone()),
        "the holder's lease is intact"
    );
    assert_eq!(current(lock, "other").await, None);
    ok(lock.release(&a).await, "release by the holder");
}

/// Item 3: tokens increase strictly across every new holder of a resource (release, expiry,
/// alternating owners).
pub async fn tokens_strictly_increase<S: TransactionalStore>(f: &Fixture<S>) {
    let lock = &*f.lock;
    let mut last: Option<u64> = None;
    for i in 0..10 {
        let owner = if i % 2 == 0 { "even" } else { "odd" };
        let lease = must_acquire(lock, "res", owner, TTL).await;
        if let Some(prev) = last {
            assert!(
                lease.token > prev,
                "token {} after {prev} must be greater",
                lease.token
            );
        }
        last = Some(lease.token);
        if i % 3 == 0 {
            f.clock.advance(TTL + Duration::from_secs(1));
        } else {
            ok(lock.release(&lease).await, "release");
        }
    }
}

/// Item 4: 32 tasks acquire one free resource at once; exactly one gets `Some`, and it is the
/// current lease.
pub async fn concurrent_acquire_one_winner<S: TransactionalStore>(f: &Fixture<S>) {
    const TASKS: usize = 32;
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let handles: Vec<_> = (0..TASKS)
        .map(|i| {
            let lock = f.lock.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                ok(
                    lock.acquire("contended", &format!("owner-{i}"), TTL).await,
                    "acquire",
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    for h in handles {
        if let Some(lease) = h.await.expect("acquire task panicked") {
            winners.push(lease);
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one of {TASKS} concurrent acquirers wins: {winners:?}"
    );
    assert_eq!(
        current(&*f.lock, "contended").await.as_ref(),
        winners.first()
    );
}

/// Item 4 after expiry: 32 tasks race to take over an expired lease; exactly one wins, with a
/// token greater than the expired one.
pub async fn concurrent_takeover_one_winner<S: TransactionalStore>(f: &Fixture<S>) {
    const TASKS: usize = 32;
    let old = must_acquire(&*f.lock, "contended", "old-holder", TTL).await;
    f.clock.advance(TTL + Duration::from_secs(1));
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let handles: Vec<_> = (0..TASKS)
        .map(|i| {
            let lock = f.lock.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                ok(
                    lock.acquire("contended", &format!("owner-{i}"), TTL).await,
                    "acquire",
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    for h in handles {
        if let Some(lease) = h.await.expect("acquire task panicked") {
            winners.push(lease);
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one of {TASKS} takes over: {winners:?}"
    );
    assert!(winners[0].token > old.token);
    assert_kind(
        f.lock.renew(&old, TTL).await,
        ErrorKind::LeaseLost,
        "renew by the old holder",
    );
}

/// `acquire` with an empty resource, an empty owner or a zero ttl fails with `InvalidInput`
/// and takes nothing.
pub async fn invalid_input<S: TransactionalStore>(f: &Fixture<S>) {
    let lock = &*f.lock;
    assert_kind(
        lock.acquire("", "owner", TTL).await,
        ErrorKind::InvalidInput,
        "acquire(empty resource)",
    );
    assert_kind(
        lock.acquire("res", "", TTL).await,
        ErrorKind::InvalidInput,
        "acquire(empty owner)",
    );
    assert_kind(
        lock.acquire("res", "owner", Duration::ZERO).await,
        ErrorKind::InvalidInput,
        "acquire(zero ttl)",
    );
    assert_eq!(
        current(lock, "res").await,
        None,
        "a rejected acquire takes nothing"
    );
    must_acquire(lock, "res", "owner", TTL).await;
}

/// The shared rule for lease names (`outbox_core::rules`), the same on every backend: a
/// resource or owner that is empty, holds a NUL or is over `MAX_FIELD_LEN` bytes fails with
/// `InvalidInput` at `acquire`, `current`, `renew` and `release`, and takes nothing.
pub async fn invalid_names<S: TransactionalStore>(f: &Fixture<S>) {
    let lock = &*f.lock;
    let held = must_acquire(lock, "held", "owner", TTL).await;
    for (what, name) in bad_names() {
        assert_kind(
            lock.acquire(&name, "owner", TTL).await,
            ErrorKind::InvalidInput,
            &format!("acquire (resource {what})"),
        );
        assert_kind(
            lock.acquire("res", &name, TTL).await,
            ErrorKind::InvalidInput,
            &format!("acquire (owner {what})"),
        );
        assert_kind(
            lock.current(&name).await,
            ErrorKind::InvalidInput,
            &format!("current (resource {what})"),
        );
        let bad_resource = Lease {
            resource: name.clone(),
            ..held.clone()
        };
        let bad_owner = Lease {
            owner: name,
            ..held.clone()
        };
        for (whose, lease) in [("resource", &bad_resource), ("owner", &bad_owner)] {
            assert_kind(
                lock.renew(lease, TTL).await,
                ErrorKind::InvalidInput,
                &format!("renew ({whose} {what})"),
            );
            assert_kind(
                lock.release(lease).await,
                ErrorKind::InvalidInput,
                &format!("release ({whose} {what})"),
            );
        }
    }
    assert_eq!(
        current(lock, "res").await,
        None,
        "a refused acquire takes nothing"
    );
    let still = current(lock, "held").await.map(|l| (l.owner, l.token));
    assert_eq!(
        still,
        Some((held.owner.clone(), held.token)),
        "refused calls leave the held lease alone"
    );
    ok(lock.release(&held).await, "release");
}

/// A resource and an owner of exactly `MAX_FIELD_LEN` bytes (multi-byte characters) work like
/// any other: acquire returns them exactly, `current` reports them, another owner of the same
/// length is refused while the lease is live, renew and release work, and the next holder
/// gets a greater token.
pub async fn longest_names<S: TransactionalStore>(f: &Fixture<S>) {
    let lock = &*f.lock;
    let resource = longest_name("resource-");
    let owner = longest_name("owner-a-");
    let other = longest_name("owner-b-");
    let lease = must_acquire(lock, &resource, &owner, TTL).await;
    assert_eq!(
        (lease.resource.as_str(), lease.owner.as_str()),
        (resource.as_str(), owner.as_str()),
        "acquire returns the names exactly"
    );
    let seen = current(lock, &resource).await.expect("the lease is live");
    assert_eq!(
        (&seen.resource, &seen.owner, seen.token),
        (&resource, &owner, lease.token),
        "current reports the names exactly"
    );
    assert_eq!(
        acquire(lock, &resource, &other, TTL).await,
        None,
        "another owner waits"
    );
    let renewed = ok(lock.renew(&lease, TTL).await, "renew(longest names)");
    assert_eq!(renewed.token, lease.token, "renew keeps the token");
    ok(lock.release(&renewed).await, "release(longest names)");
    let next = must_acquire(lock, &resource, &other, TTL).await;
    assert!(
        next.token > lease.token,
        "the next holder gets a greater token"
    );
    assert_eq!(next.owner, other);
}
