#![doc = include_str!("../README.md")]

pub mod repos;

use async_trait::async_trait;
use outbox::{Error, ErrorKind, Message, MessageId, RelayHandle, Transaction, TransactionalStore};
use serde::{Deserialize, Serialize};

/// The topic every placed order is announced on.
pub const ORDER_PLACED: &str = "orders.placed";

/// An order, as the service stores it and announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The caller's order id (the message key: one customer-facing order, one ordered stream).
    pub id: String,
    /// Who placed it.
    pub customer: String,
    /// Its total, in cents.
    pub total_cents: i64,
}

/// Where the service keeps its orders: the business writes, made inside the outbox's
/// transaction so that an order and its `orders.placed` event commit together or not at all.
/// One implementation per backend ([`repos`]); the service is written once against this trait.
#[async_trait]
pub trait OrderRepository: Send + Sync {
    /// The outbox store the orders live beside.
    type Store: TransactionalStore;

    /// Create what the repository needs (its table). Idempotent.
    async fn migrate(&self) -> outbox::Result<()>;

    /// Stage `order` in `tx`. A duplicate id fails here or at commit (see
    /// [`is_duplicate`](Self::is_duplicate)).
    async fn insert(
        &self,
        tx: &mut <Self::Store as TransactionalStore>::Tx,
        order: &Order,
    ) -> outbox::Result<()>;

    /// The committed order `id`, if any.
    async fn get(&self, id: &str) -> outbox::Result<Option<Order>>;

    /// Whether `e`, from `insert` or from the commit, says the order id was taken.
    fn is_duplicate(&self, e: &Error) -> bool {
        e.kind() == ErrorKind::AlreadyExists
    }
}

/// Why an order was not placed.
#[derive(Debug)]
pub enum PlaceError {
    /// The order is malformed (empty id or customer, negative total); nothing was written.
    Invalid(String),
    /// An order with this id exists; nothing was written.
    Duplicate(String),
    /// The store failed; nothing was written (the transaction rolled back), retry if
    /// [`Error::is_retryable`].
    Store(Error),
}

impl std::fmt::Display for PlaceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlaceError::Invalid(why) => write!(f, "invalid order: {why}"),
            PlaceError::Duplicate(id) => write!(f, "order {id:?} exists already"),
            PlaceError::Store(e) => write!(f, "store error: {e}"),
        }
    }
}

impl std::error::Error for PlaceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PlaceError::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// The order service: one code path for every backend.
#[derive(Debug)]
pub struct OrderService<R: OrderRepository> {
    store: R::Store,
    repo: R,
    relay: Option<RelayHandle>,
}

impl<R: OrderRepository> OrderService<R> {
    /// A service writing through `repo` into `store` (the same store the repository was
    /// built on).
    pub fn new(store: R::Store, repo: R) -> Self {
        OrderService {
            store,
            repo,
            relay: None,
        }
    }

    /// Wake this in-process relay after each commit (without one, a relay process finds
    /// the messages by polling or by the store's own signal).
    pub fn with_relay(mut self, relay: RelayHandle) -> Self {
        self.relay = Some(relay);
        self
    }

    /// The repository.
    pub fn repository(&self) -> &R {
        &self.repo
    }

    /// Place `order`: its row and its `orders.placed` event in one transaction. Returns the
    /// event's id.
    ///
    /// # Errors
    /// [`PlaceError`]; in every case nothing of the order was written.
    pub async fn place(&self, order: &Order) -> Result<MessageId, PlaceError> {
        if order.id.is_empty() || order.customer.is_empty() {
            return Err(PlaceError::Invalid(
                "id and customer must not be empty".into(),
            ));
        }
        if order.total_cents < 0 {
            return Err(PlaceError::Invalid("the total must not be negative".into()));
        }
        let store_err = |e: Error| {
            if self.repo.is_duplicate(&e) {
                PlaceError::Duplicate(order.id.clone())
            } else {
                PlaceError::Store(e)
            }
        };
        let payload = serde_json::to_vec(order)
            .map_err(|e| PlaceError::Invalid(format!("cannot encode the order: {e}")))?;
        let event = Message::builder(ORDER_PLACED)
            .key(&order.id)
            .content_type("application/json")
            .payload(payload)
            .build()
            .map_err(|e| PlaceError::Invalid(e.to_string()))?;
        let mut tx = self.store.begin().await.map_err(PlaceError::Store)?;
        // On any error below the transaction is dropped, which rolls it back.
        self.repo.insert(&mut tx, order).await.map_err(store_err)?;
        tx.add(&event).await.map_err(store_err)?;
        let committed = tx.commit().await.map_err(store_err)?;
        if let Some(relay) = &self.relay {
            relay.notify(&committed);
        }
        Ok(event.id)
    }

    /// The order `id`, if it was placed.
    ///
    /// # Errors
    /// Store errors.
    pub async fn order(&self, id: &str) -> outbox::Result<Option<Order>> {
        self.repo.get(id).await
    }
}
