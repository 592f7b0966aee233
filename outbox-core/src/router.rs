//! Dispatch by message type to typed handlers: a [`MessageHandler`] for [`InboxProcessor`].
//!
//! A [`Router`] looks at a delivery's type name (the [`TYPE_NAME_HEADER`] header, set by
//! [`Message::typed`]), decodes the JSON payload into the type registered for that name, and
//! calls its [`TypedHandler`] with the value, the message and the store's transaction. A
//! payload that does not decode is dead-lettered at once with the decoding error as reason;
//! a message with no or an unknown type name gets the [`UnknownType`] outcome configured.
//!
//! [`InboxProcessor`]: crate::InboxProcessor

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::message::{Message, TYPE_NAME_HEADER, TypedMessage};
use crate::processor::{HandlerError, MessageHandler};

/// Application logic for messages of one type `T`, inside the store's transaction `Tx`.
#[async_trait]
pub trait TypedHandler<T, Tx: Send>: Send + Sync {
    /// Handle `value` (decoded from `message`), writing through `tx`; the same contract as
    /// [`MessageHandler::handle`].
    async fn handle(&self, value: T, message: &Message, tx: &mut Tx) -> Result<(), HandlerError>;
}

/// What a [`Router`] does with a message whose type name it has no route for (or that has no
/// type name at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UnknownType {
    /// Dead-letter it at once, with a reason naming the type (the default): nothing here will
    /// ever handle it, and the dead-letter destination keeps it for inspection.
    #[default]
    DeadLetter,
    /// Fail the delivery like a handler error: redelivered, dead-lettered on the
    /// `max_deliveries`-th delivery (for a rolling deployment where a newer consumer will
    /// know the type).
    Retry,
    /// Acknowledge it without effect (its inbox entry is recorded), logging it at debug level.
    Skip,
}

#[async_trait]
trait Route<Tx: Send>: Send + Sync {
    async fn handle(&self, message: &Message, tx: &mut Tx) -> Result<(), HandlerError>;
}

struct TypedRoute<T, H> {
    handler: H,
    _type: PhantomData<fn() -> T>,
}

#[async_trait]
impl<T, H, Tx> Route<Tx> for TypedRoute<T, H>
where
    T: TypedMessage + Send + 'static,
    H: TypedHandler<T, Tx>,
    Tx: Send,
{
    async fn handle(&self, message: &Message, tx: &mut Tx) -> Result<(), HandlerError> {
        let value: T = message.decode_json().map_err(|e| {
            HandlerError::permanent(format!("type {}: {}", T::TYPE_NAME, e.message()))
        })?;
        self.handler.handle(value, message, tx).await
    }
}

/// A [`MessageHandler`] that dispatches by type name to [`TypedHandler`]s.
///
/// ```
/// use outbox_core::memory::{MemoryStore, MemoryTx};
/// use outbox_core::{HandlerError, Message, Router, TypedHandler, TypedMessage, async_trait};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderPlaced { id: u64 }
/// impl TypedMessage for OrderPlaced { const TYPE_NAME: &'static str = "order.placed"; }
///
/// struct Billing;
/// #[async_trait]
/// impl TypedHandler<OrderPlaced, MemoryTx> for Billing {
///     async fn handle(&self, order: OrderPlaced, _m: &Message, tx: &mut MemoryTx)
///         -> Result<(), HandlerError> {
///         tx.put_record(format!("invoice/{}", order.id), "open");
///         Ok(())
///     }
/// }
///
/// let router = Router::<MemoryTx>::new().route::<OrderPlaced, _>(Billing).unwrap();
/// let processor = outbox_core::InboxProcessor::new(
///     std::sync::Arc::new(MemoryStore::new()), "billing", router).unwrap();
/// # let _ = processor;
/// ```
pub struct Router<Tx> {
    routes: HashMap<&'static str, Box<dyn Route<Tx>>>,
    unknown: UnknownType,
}

impl<Tx> fmt::Debug for Router<Tx> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<_> = self.routes.keys().collect();
        types.sort();
        f.debug_struct("Router")
            .field("types", &types)
            .field("unknown", &self.unknown)
            .finish()
    }
}

impl<Tx: Send + 'static> Default for Router<Tx> {
    fn default() -> Self {
        Self::new()
    }
}

impl<Tx: Send + 'static> Router<Tx> {
    /// A router with no routes; unknown types are dead-lettered.
    pub fn new() -> Self {
        Router {
            routes: HashMap::new(),
            unknown: UnknownType::default(),
        }
    }

    /// Send messages of type name `T::TYPE_NAME` to `handler`.
    ///
    /// # Errors
    /// `AlreadyExists` when `T::TYPE_NAME` already has a route; `InvalidInput` for an empty
    /// type name.
    pub fn route<T, H>(mut self, handler: H) -> Result<Self>
    where
        T: TypedMessage + Send + 'static,
        H: TypedHandler<T, Tx> + 'static,
    {
        if T::TYPE_NAME.is_empty() {
            return Err(Error::invalid_input(format!(
                "Router: {} has an empty TYPE_NAME",
                std::any::type_name::<T>()
            )));
        }
        if self.routes.contains_key(T::TYPE_NAME) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("Router: type {:?} already has a route", T::TYPE_NAME),
            ));
        }
        self.routes.insert(
            T::TYPE_NAME,
            Box::new(TypedRoute {
                handler,
                _type: PhantomData,
            }),
        );
        Ok(self)
    }

    /// What to do with messages of no or an unknown type name (default
    /// [`UnknownType::DeadLetter`]).
    pub fn on_unknown(mut self, outcome: UnknownType) -> Self {
        self.unknown = outcome;
        self
    }

    /// Whether a route exists for `type_name`.
    pub fn handles(&self, type_name: &str) -> bool {
        self.routes.contains_key(type_name)
    }
}

#[async_trait]
impl<Tx: Send + 'static> MessageHandler<Tx> for Router<Tx> {
    async fn handle(&self, message: &Message, tx: &mut Tx) -> Result<(), HandlerError> {
        let route = message.type_name().and_then(|t| self.routes.get(t));
        if let Some(route) = route {
            return route.handle(message, tx).await;
        }
        let reason = match message.type_name() {
            Some(t) => format!("no route for message type {t:?}"),
            None => format!("message has no {TYPE_NAME_HEADER} header; no route for it"),
        };
        match self.unknown {
            UnknownType::DeadLetter => Err(HandlerError::permanent(reason)),
            UnknownType::Retry => Err(HandlerError::new(reason)),
            UnknownType::Skip => {
                tracing::debug!(message_id = %message.id, %reason, "skipped");
                Ok(())
            }
        }
    }
}
