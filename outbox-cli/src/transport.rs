//! Opening a producer from its [`TransportLocation`], through each transport crate's public
//! API.

use std::sync::Arc;

use outbox_core::Producer;

use crate::location::TransportLocation;
use crate::util::{CliError, CliResult, missing_feature};

/// A producer for `location`. Kafka takes every other librdkafka setting from the
/// `OUTBOX_KAFKA_*` environment variables (the URL's brokers win over
/// `OUTBOX_KAFKA_BOOTSTRAP_SERVERS`).
pub async fn open(location: &TransportLocation) -> CliResult<Arc<dyn Producer>> {
    let context = |e: outbox_core::Error| CliError::from(e).context(format_args!("{location}"));
    match location {
        #[cfg(feature = "kafka")]
        TransportLocation::Kafka { brokers } => {
            let prefix = outbox_kafka::ENV_PREFIX;
            let mut vars: Vec<(String, String)> = std::env::vars()
                .filter(|(name, _)| name.starts_with(prefix))
                .collect();
            for (name, value) in &vars {
                if name.contains("PASSWORD") || name.contains("SECRET") || name.ends_with("_KEY") {
                    crate::location::remember_secret(value);
                }
            }
            vars.push((format!("{prefix}BOOTSTRAP_SERVERS"), brokers.clone()));
            let config = outbox_kafka::KafkaConfig::from_env_vars(prefix, vars).map_err(context)?;
            let producer = outbox_kafka::KafkaProducer::new(&config).map_err(context)?;
            Ok(Arc::new(producer))
        }
        #[cfg(feature = "rabbitmq")]
        TransportLocation::Amqp { url, exchange } => {
            let url = outbox_rabbitmq::AmqpUrl::parse(url.clone()).map_err(context)?;
            let config = outbox_rabbitmq::ProducerConfig::new(
                outbox_rabbitmq::ConnectionConfig::new(url),
                exchange.clone(),
            );
            let producer = outbox_rabbitmq::RabbitMqProducer::connect(config)
                .await
                .map_err(context)?;
            Ok(Arc::new(producer))
        }
        #[allow(unreachable_patterns)] // every feature on: every location is handled above
        _ => Err(missing_feature(location.feature())),
    }
}
