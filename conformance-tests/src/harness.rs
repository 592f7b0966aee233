//! What a backend hands the suite ([`Fixture`]), what the suite hands the backend
//! ([`SetupContext`]), and the runner the test macros expand to.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{
    Clock, Committed, DistributedLock, Error, ErrorKind, InboxEntry, InboxStore, InsertOutcome,
    ManualClock, Message, OutboxStore, Result, SharedClock, Transaction, TransactionalStore,
};

/// Environment variable that turns "backend service unavailable" from a skip into a failure
/// (set it in CI).
pub const REQUIRED_ENV: &str = "OUTBOX_TEST_REQUIRED";

/// The caller's own data ("business rows"), written inside a backend transaction.
///
/// The suite writes a record and an outbox message (or inbox entry) in one transaction, and
/// checks both exist after commit and neither after rollback. Implement it with whatever the
/// backend's transaction handle offers: an `INSERT` on the transaction's connection, a staged
/// `Put` in a DynamoDB unit of work, `MemoryTx::put_record` for the in-memory backend.
#[async_trait]
pub trait BusinessRecords<Tx>: Send + Sync {
    /// Write a record named `key` through `tx` (visible only if `tx` commits).
    async fn write(&self, tx: &mut Tx, key: &str) -> Result<()>;

    /// Whether a committed record named `key` exists, read outside any transaction.
    async fn exists(&self, key: &str) -> Result<bool>;
}

/// Everything a case needs, built fresh and isolated (empty) for every case by the backend's
/// setup function.
///
/// `outbox`, `inbox` and `tx_store` are usually the same backend object seen through different
/// traits. Every time-dependent decision of the backend (due messages, retention, lease expiry)
/// must read [`SetupContext::clock`]; put that same clock in [`clock`](Self::clock), so the
/// suite moves the backend's time with [`ManualClock::advance`].
pub struct Fixture<S: TransactionalStore> {
    /// The outbox store under test.
    pub outbox: Arc<dyn OutboxStore>,
    /// The inbox store under test.
    pub inbox: Arc<dyn InboxStore>,
    /// The distributed lock under test.
    pub lock: Arc<dyn DistributedLock>,
    /// Opens transactions spanning business records, outbox adds and inbox inserts. Use
    /// [`NoTransactions`] when `capabilities().transactions` is false.
    pub tx_store: Arc<S>,
    /// The caller's own rows, written inside a transaction of `tx_store`.
    pub records: Arc<dyn BusinessRecords<S::Tx>>,
    /// The clock the backend was built with (the one from [`SetupContext`]).
    pub clock: ManualClock,
    /// Anything that must live as long as the case (temporary directories, connection
    /// guards). Dropped after the case.
    pub keep_alive: Vec<Box<dyn Any + Send + Sync>>,
}

impl<S: TransactionalStore> std::fmt::Debug for Fixture<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("outbox", &self.outbox)
            .field("inbox", &self.inbox)
            .field("lock", &self.lock)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Fixture<NoTransactions> {
    /// A fixture for a backend without transactions (`capabilities().transactions == false`):
    /// the cases that need transactions are reported as ignored, everything else runs.
    pub fn without_transactions(
        outbox: Arc<dyn OutboxStore>,
        inbox: Arc<dyn InboxStore>,
        lock: Arc<dyn DistributedLock>,
        clock: ManualClock,
    ) -> Self {
        Fixture {
            outbox,
            inbox,
            lock,
            tx_store: Arc::new(NoTransactions),
            records: Arc::new(NoTransactions),
            clock,
            keep_alive: Vec::new(),
        }
    }
}

/// What the suite gives the backend's setup function for one case.
#[derive(Debug, Clone)]
pub struct SetupContext {
    /// Unique per case and run, e.g. `store_round_trip_k3x9q2mb`: lower-case ASCII letters,
    /// digits and `_`, starting with a letter, at most 63 bytes. Use it for table prefixes,
    /// schemas, file names, so cases running in parallel never share data.
    pub name: String,
    /// The clock to build the backend with; also goes into [`Fixture::clock`].
    pub clock: ManualClock,
}

impl SetupContext {
    /// A context for `case`: a unique name and a fresh manual clock at the current wall time.
    pub fn new(case: &str) -> Self {
        let mut base: String = case
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(54)
            .collect();
        if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
            base.insert(0, 'c');
        }
        let suffix: String = (0..8).map(|_| fastrand::lowercase()).collect();
        SetupContext {
            name: format!("{base}_{suffix}"),
            clock: ManualClock::new(),
        }
    }

    /// The clock as the `Arc<dyn Clock>` backend builders take.
    pub fn shared_clock(&self) -> SharedClock {
        Arc::new(self.clock.clone())
    }
}

/// Stand-in transactional store for backends without transactions; `begin` fails with
/// `Unsupported`. The cases that need transactions are not run against it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTransactions;

/// The transaction type of [`NoTransactions`]; it has no values.
#[derive(Debug)]
pub enum NoTransaction {}

#[async_trait]
impl TransactionalStore for NoTransactions {
    type Tx = NoTransaction;

    async fn begin(&self) -> Result<NoTransaction> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "this backend has no transactions",
        ))
    }
}

#[async_trait]
impl Transaction for NoTransaction {
    async fn add(&mut self, _message: &Message) -> Result<()> {
        match *self {}
    }
    async fn inbox_insert(&mut self, _entry: &InboxEntry) -> Result<InsertOutcome> {
        match *self {}
    }
    async fn commit(self) -> Result<Committed> {
        match self {}
    }
    async fn rollback(self) -> Result<()> {
        match self {}
    }
}

#[async_trait]
impl BusinessRecords<NoTransaction> for NoTransactions {
    async fn write(&self, tx: &mut NoTransaction, _key: &str) -> Result<()> {
        match *tx {}
    }
    async fn exists(&self, _key: &str) -> Result<bool> {
        Ok(false)
    }
}

/// Run `fut` on a fresh multi-thread tokio runtime with 4 workers (what every case of a
/// [`Suite`](crate::Suite) does).
///
/// # Panics
/// If the runtime cannot be built, or `fut` panics.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("build the tokio runtime")
        .block_on(fut)
}

/// Build the fixture of `case` with the backend's `setup`.
///
/// Returns `Err(reason)` when setup fails with `ErrorKind::Unavailable` (the backend's service
/// is absent) and [`REQUIRED_ENV`] is not `1`: the runner reports the case as ignored with
/// that reason.
///
/// # Panics
/// On any other setup error, when the service is absent but required, when the fixture's
/// clock is not the context's clock, and when the store is not empty.
pub async fn setup<S, F, Fut>(case: &str, setup: F) -> std::result::Result<Fixture<S>, String>
where
    S: TransactionalStore,
    F: FnOnce(SetupContext) -> Fut,
    Fut: Future<Output = Result<Fixture<S>>>,
{
    let ctx = SetupContext::new(case);
    let clock = ctx.clock.clone();
    let fixture = match setup(ctx).await {
        Ok(f) => f,
        Err(e) => return Err(unavailable(case, "backend", e)),
    };
    clock.advance(Duration::from_micros(1));
    assert_eq!(
        fixture.clock.now(),
        clock.now(),
        "Fixture::clock must be the clock from SetupContext (the one the backend was built with)"
    );
    let stats = fixture
        .outbox
        .stats()
        .await
        .unwrap_or_else(|e| panic!("stats of the fresh store of {case} failed: {e}"));
    assert_eq!(
        stats,
        outbox_core::OutboxStats::default(),
        "setup must return an empty store for {case}; isolate cases with SetupContext::name"
    );
    Ok(fixture)
}

/// The reason to report for a setup that failed because `what` is not running, when that is
/// allowed ([`REQUIRED_ENV`] is not `1`).
///
/// # Panics
/// On any other error, and on `Unavailable` when the service is required.
pub(crate) fn unavailable(case: &str, what: &str, e: Error) -> String {
    let required = std::env::var(REQUIRED_ENV).is_ok_and(|v| v == "1");
    if e.kind() == ErrorKind::Unavailable && !required {
        format!("{what} unavailable ({e}); set {REQUIRED_ENV}=1 to fail instead")
    } else {
        panic!("setup of {case} failed: {e}")
    }
}
