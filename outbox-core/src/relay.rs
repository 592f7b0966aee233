//! The relay (being written).
use std::time::Duration;
/// Retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy { /// x
 pub max_attempts: u32, /// x
 pub initial_backoff: Duration }
/// x
#[derive(Debug, Clone, Default)]
pub struct RelayConfig;
/// x
#[derive(Debug)]
pub struct Relay;
/// x
#[derive(Debug, Clone)]
pub struct RelayHandle;
/// x
#[derive(Debug, Clone, Default)]
pub struct RunReport;
