//! Opening a producer from its [`TransportLocation`], through each transport crate's public
//! API.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::Producer;
use outbox_core::cloudevents::CloudEvents;

use crate::location::TransportLocation;
#[cfg(any(feature = "kafka", feature = "rabbitmq"))]
use crate::util::CliError;
use crate::util::{CliResult, missing_feature};

/// A producer for `location` whose sends end within `publish_timeout` where the transport
/// lets us bound them. Kafka takes every other librdkafka setting from the `OUTBOX_KAFKA_*`
/// environment variables (the URL's brokers win over `OUTBOX_KAFKA_BOOTSTRAP_SERVERS`);
/// without `OUTBOX_KAFKA_MESSAGE_TIMEOUT_MS` (or `..._DELIVERY_TIMEOUT_MS`) librdkafka's
/// the local queue wait is a fifth of `publish_timeout` and librdkafka's `message.timeout.ms`
/// the rest, and RabbitMQ's confirm timeout is `publish_timeout`: so the producer's
/// [`Producer::delivery_timeout`] never exceeds the relay's `publish_timeout`, and a send the
/// relay gave up on cannot land after its lease expired.
///
/// With `cloud_events`, every message is sent as a CloudEvent in binary content mode (see the
/// transport crates' READMEs).
pub async fn open(
    location: &TransportLocation,
    publish_timeout: Duration,
    cloud_events: Option<CloudEvents>,
) -> CliResult<Arc<dyn Producer>> {
    #[cfg(any(feature = "kafka", feature = "rabbitmq"))]
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
            let bounded = vars.iter().any(|(name, _)| {
                name == &format!("{prefix}MESSAGE_TIMEOUT_MS")
                    || name == &format!("{prefix}DELIVERY_TIMEOUT_MS")
            });
            let queue_wait = publish_timeout / 5;
            if !bounded {
                vars.push((
                    format!("{prefix}MESSAGE_TIMEOUT_MS"),
                    (publish_timeout - queue_wait)
                        .as_millis()
                        .max(1)
                        .to_string(),
                ));
            }
            let config = outbox_kafka::KafkaConfig::from_env_vars(prefix, vars)
                .map_err(context)?
                .with_send_queue_timeout(queue_wait);
            let mut producer = outbox_kafka::KafkaProducer::new(&config).map_err(context)?;
            if let Some(ce) = cloud_events {
                producer = producer.with_cloud_events(ce);
            }
            Ok(Arc::new(producer))
        }
        #[cfg(feature = "rabbitmq")]
        TransportLocation::Amqp { url, exchange } => {
            let url = outbox_rabbitmq::AmqpUrl::parse(url.clone()).map_err(context)?;
            let mut config = outbox_rabbitmq::ProducerConfig::new(
                outbox_rabbitmq::ConnectionConfig::new(url),
                exchange.clone(),
            );
            config.confirm_timeout = publish_timeout;
            config.cloud_events = cloud_events;
            let producer = outbox_rabbitmq::RabbitMqProducer::connect(config)
                .await
                .map_err(context)?;
            Ok(Arc::new(producer))
        }
        #[allow(unreachable_patterns)] // every feature on: every location is handled above
        _ => {
            let _ = (publish_timeout, cloud_events);
            Err(missing_feature(location.feature()))
        }
    }
}
