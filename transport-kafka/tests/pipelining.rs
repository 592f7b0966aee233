//! Pipelined producing and batched commits against the real broker in
//! `OUTBOX_TEST_KAFKA_BROKERS` (skipped, with a printed reason, when unset; failing when
//! `OUTBOX_TEST_REQUIRED=1`). Each test has its own topics and consumer group.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{KafkaHarness, MAX_BYTES, msg, receive, unique};
use outbox_core::{Consumer, ErrorKind, Message, Producer};
use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use outbox_kafka::rdkafka::{Offset, TopicPartitionList};
use outbox_kafka::{ConsumerOptions, KafkaConsumer};

/// The ids of the records of partition 0 of the harness's topic, in offset order: read
/// (without a group) until `expected` arrived (at most 30 s), then for `linger` more, to see
/// whether anything else is there. (Not `common::read_partition`: the test broker, tansu,
/// reports the high watermark of a multi-record batch as its base offset + 1.)
async fn partition_ids(h: &KafkaHarness, expected: usize, linger: Duration) -> Vec<String> {
    let reader: StreamConsumer = h
        .config
        .to_client_config()
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&h.topic, 0, Offset::Beginning)
        .unwrap();
    reader.assign(&tpl).unwrap();
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let wait_until = if ids.len() >= expected {
            tokio::time::Instant::now() + linger
        } else {
            deadline
        };
        match tokio::time::timeout_at(wait_until, reader.recv()).await {
            Ok(Ok(r)) => ids.push(outbox_kafka::decode_message(&r).unwrap().id.to_string()),
            Ok(Err(e)) => panic!("reading {}: {e}", h.topic),
            Err(_) => return ids,
        }
    }
}

/// A chain of 300 is enqueued at once: while `send_ordered` waits, librdkafka holds many of
/// its records unconfirmed (sampled; stop-and-wait would never show more than 1). All 300
/// are confirmed and the partition holds them in chain order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_ordered_enqueues_the_chain_at_once_and_keeps_its_order() {
    let h = harness!("send_ordered_at_once", 1);
    let chain: Vec<Message> = (0..300)
        .map(|i| msg(&h.topic, "k", &i.to_string()))
        .collect();
    let p = h.producer.clone();
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (p, most, done) = (p.clone(), most.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                most.fetch_max(p.in_flight(), Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        })
    };
    let results = p.send_ordered(&chain).await;
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    assert_eq!(results.len(), 300);
    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    let most = most.load(Ordering::SeqCst);
    assert!(most > 1, "at most {most} record(s) were ever in flight");
    let ids = partition_ids(&h, 300, Duration::ZERO).await;
    let sent: Vec<String> = chain.iter().map(|m| m.id.to_string()).collect();
    assert!(ids == sent, "the partition holds the chain in order");
}

/// A record over `message.max.bytes` in the middle of a chain is not enqueued, and nothing
/// after it is: 3 `Ok`, a permanent `PayloadTooLarge`, no further result, and the partition
/// holds exactly the 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_ordered_sends_nothing_after_a_record_it_cannot_enqueue() {
    let h = harness!("send_ordered_too_large", 1);
    let mut chain: Vec<Message> = (0..3).map(|i| msg(&h.topic, "k", &i.to_string())).collect();
    chain.push(
        Message::builder(&h.topic)
            .key("k")
            .payload(vec![1u8; MAX_BYTES + 1])
            .build()
            .unwrap(),
    );
    chain.extend((0..3).map(|i| msg(&h.topic, "k", &format!("after {i}"))));
    let results = h.producer.send_ordered(&chain).await;
    assert_eq!(results.len(), 4, "{results:?}");
    assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
    let e = results[3].as_ref().unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::PayloadTooLarge { .. }), "{e}");
    assert!(!e.is_retryable());
    h.producer.flush(Duration::from_secs(10)).await.unwrap();
    let ids = partition_ids(&h, 3, Duration::from_secs(1)).await;
    let sent: Vec<String> = chain[..3].iter().map(|m| m.id.to_string()).collect();
    assert_eq!(ids, sent, "exactly the 3 before it");
}

/// The committed offset of partition 0 of the harness's topic, for its group.
fn committed(h: &KafkaHarness) -> Option<i64> {
    let reader: BaseConsumer = h
        .config
        .to_client_config()
        .set("group.id", &h.group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&h.topic, 0);
    let got = reader
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    match got.elements()[0].offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Wait (at most 10 s) until the committed offset is `expected`; returns the last one seen.
async fn committed_becomes(h: &KafkaHarness, expected: i64) -> Option<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = committed(h);
        if c == Some(expected) || tokio::time::Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Timed commits: with `commit_every` out of reach, acks are committed by the
/// `commit_interval` timer alone, never past the lowest unacked record: acking 0, 1, 3, 4
/// (2 held) commits 2; acking 2 then commits 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acks_are_committed_by_the_interval_never_past_an_unacked_record() {
    let h = harness!("commit_interval", 1);
    for i in 0..5 {
        h.producer
            .send(&msg(&h.topic, "k", &i.to_string()))
            .await
            .unwrap();
    }
    let mut options = ConsumerOptions::new(&h.group, [&h.topic]);
    options.commit_every = 1000;
    options.commit_interval = Duration::from_millis(50);
    let c = KafkaConsumer::new(&h.config, options).unwrap();
    let mut d = Vec::new();
    for _ in 0..5 {
        d.push(receive(&c).await);
    }
    for i in [0, 1, 3, 4] {
        c.ack(&d[i]).await.unwrap();
    }
    assert_eq!(committed_becomes(&h, 2).await, Some(2));
    // Long past the interval: still 2 (record 2 is unacked).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(committed(&h), Some(2));
    c.ack(&d[2]).await.unwrap();
    assert_eq!(committed_becomes(&h, 5).await, Some(5));
}

/// Counted commits: with an interval of an hour, the third ack commits at once; a fourth
/// stays uncommitted (no timer fires), until an explicit `commit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_nth_ack_commits_at_once() {
    let h = harness!("commit_every", 1);
    for i in 0..4 {
        h.producer
            .send(&msg(&h.topic, "k", &i.to_string()))
            .await
            .unwrap();
    }
    let mut options = ConsumerOptions::new(&h.group, [&h.topic]);
    options.commit_every = 3;
    options.commit_interval = Duration::from_secs(3600);
    let c = KafkaConsumer::new(&h.config, options).unwrap();
    for _ in 0..3 {
        let d = receive(&c).await;
        c.ack(&d).await.unwrap();
    }
    assert_eq!(committed_becomes(&h, 3).await, Some(3));
    let d = receive(&c).await;
    c.ack(&d).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(committed(&h), Some(3), "the fourth ack waits for its batch");
    c.commit().await.unwrap();
    assert_eq!(committed(&h), Some(4));
}

/// Rough throughput of raw rdkafka (same settings: idempotent, acks=all, linger.ms=1; all
/// enqueued, then every report), `send_ordered` chains, `send_batch` and one `send` at a
/// time. Not a benchmark: run by hand with
/// `cargo test --release -p outbox-kafka --test pipelining -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a rough measurement, not a test"]
async fn rough_throughput() {
    use outbox_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
    const N: usize = 20_000;
    let h = harness!("rough_throughput", 1);
    let chain: Vec<Message> = (0..N).map(|i| msg(&h.topic, "k", &i.to_string())).collect();
    let raw: FutureProducer = h
        .config
        .to_client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .create()
        .unwrap();
    let started = std::time::Instant::now();
    let mut reports = Vec::with_capacity(N);
    for m in &chain {
        let r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&h.topic)
            .key(b"k".as_slice())
            .payload(m.payload.as_ref());
        reports.push(raw.send_result(r).map_err(|(e, _)| e).unwrap());
    }
    for r in reports {
        r.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    let t = started.elapsed();
    eprintln!(
        "raw rdkafka, all at once: {N} in {t:?} = {:.0}/s",
        N as f64 / t.as_secs_f64()
    );
    let p = h.producer.clone();
    let started = std::time::Instant::now();
    for part in chain.chunks(500) {
        assert!(p.send_ordered(part).await.iter().all(Result::is_ok));
    }
    let t = started.elapsed();
    eprintln!(
        "send_ordered, chains of 500: {N} in {t:?} = {:.0}/s",
        N as f64 / t.as_secs_f64()
    );
    let started = std::time::Instant::now();
    for part in chain.chunks(1000) {
        assert!(p.send_batch(part).await.iter().all(Result::is_ok));
    }
    let t = started.elapsed();
    eprintln!(
        "send_batch of 1000: {N} in {t:?} = {:.0}/s",
        N as f64 / t.as_secs_f64()
    );
    let started = std::time::Instant::now();
    for m in &chain[..500] {
        p.send(m).await.unwrap();
    }
    let t = started.elapsed();
    eprintln!(
        "send one at a time: 500 in {t:?} = {:.0}/s",
        500.0 / t.as_secs_f64()
    );
}
