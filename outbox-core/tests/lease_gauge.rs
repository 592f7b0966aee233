//! The `outbox_relay_leases_held` gauge follows the leases a relay holds: set when leases are
//! acquired and released, not only at renewal (a recorder of our own captures every `set`).
#![allow(clippy::unwrap_used)] // test helpers may panic

use std::sync::{Arc, Mutex};

use metrics::{
    Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use outbox_core::memory::{MemoryBroker, MemoryLock, MemoryStore};
use outbox_core::metrics::LEASES_HELD;
use outbox_core::{Relay, RelayConfig, SystemClock};

/// Every value set on the leases-held gauge, in order.
#[derive(Default)]
struct HeldRecorder {
    values: Arc<Mutex<Vec<f64>>>,
}

struct HeldGauge(Arc<Mutex<Vec<f64>>>);

impl GaugeFn for HeldGauge {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

impl Recorder for HeldRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        if key.name() == LEASES_HELD {
            Gauge::from_arc(Arc::new(HeldGauge(self.values.clone())))
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn leases_held_is_set_on_acquire_and_on_release() {
    let recorder = HeldRecorder::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let store = MemoryStore::builder().with_shard_count(4).build().unwrap();
    let lock = MemoryLock::new(Arc::new(SystemClock));
    let broker = MemoryBroker::new();
    let relay = Relay::new(
        Arc::new(store),
        Arc::new(lock),
        Arc::new(broker.producer()),
        RelayConfig::default(),
    )
    .unwrap();

    // run_once acquires every free shard, publishes, and releases them: no renewal happens.
    relay.run_once().await.unwrap();
    let values = recorder.values.lock().unwrap().clone();
    assert_eq!(
        values,
        vec![1.0, 2.0, 3.0, 4.0, 0.0],
        "one set per acquired lease, then 0 on release"
    );
}
