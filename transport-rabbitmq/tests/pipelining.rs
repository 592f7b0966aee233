//! Pipelined publishing against the real broker (`OUTBOX_TEST_RABBITMQ_URL`): many
//! unconfirmed publishes per channel, ordered chains sharing channels, returns and nacks
//! attributed to the right message, and the confirm timeout. Each test declares its own
//! exchange and queues and deletes them after. For the timeout, the producer talks to the
//! broker through a TCP relay in this process that can hold back the broker's replies (a
//! network that stops answering); the broker itself is never touched.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{msg, unique, url_or_skip};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use outbox_core::{Consumer, ErrorKind, Message, MessageId, Producer};
use outbox_rabbitmq::{AmqpUrl, ConnectionConfig, ProducerConfig, RabbitMqProducer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// How many messages `queue` holds (passive declare on a connection of its own).
async fn queue_depth(url: &AmqpUrl, queue: &str) -> u32 {
    let c = Connection::connect(url.expose(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = c.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = c.close(200, "OK".into()).await;
    q.message_count()
}

/// Wait (at most 10 s) until `queue` holds `expected` messages; returns the last depth.
async fn wait_for_depth(url: &AmqpUrl, queue: &str, expected: u32) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let depth = queue_depth(url, queue).await;
        if depth >= expected || tokio::time::Instant::now() > deadline {
            return depth;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP relay to the broker. While `hold` is set, bytes from the broker are held back
/// (not read), so the client's publishes reach the broker but no confirm comes back.
struct Relay {
    port: u16,
    hold: Arc<AtomicBool>,
    released: Arc<Notify>,
}

impl Relay {
    async fn start(broker: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = Arc::new(AtomicBool::new(false));
        let released = Arc::new(Notify::new());
        let (h, r) = (hold.clone(), released.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(&broker).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut uw).await;
                    let _ = uw.shutdown().await;
                });
                let (h, r) = (h.clone(), r.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        while h.load(Ordering::SeqCst) {
                            r.notified().await;
                        }
                        match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                // Held while this read was pending: keep the bytes back.
                                while h.load(Ordering::SeqCst) {
                                    r.notified().await;
                                }
                                if cw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        Relay {
            port,
            hold,
            released,
        }
    }

    fn hold(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.released.notify_waiters();
    }
}

/// `amqp://user:pass@host:port/vhost` with host and port replaced by `127.0.0.1:port`, and
/// the original `host:port`.
fn via(url: &AmqpUrl, port: u16) -> (AmqpUrl, String) {
    let raw = url.expose();
    let (scheme, rest) = raw.split_once("://").unwrap();
    let (auth, tail) = rest.rsplit_once('@').map_or(("", rest), |(a, t)| (a, t));
    let (hostport, path) = tail.split_once('/').map_or((tail, ""), |(h, p)| (h, p));
    let broker = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    };
    let at = if auth.is_empty() { "" } else { "@" };
    let proxied = format!("{scheme}://{auth}{at}127.0.0.1:{port}/{path}");
    (AmqpUrl::parse(proxied).unwrap(), broker)
}

/// With the broker's replies held back, a chain of 100 is published in full (all 100 reach
/// the queue while none is confirmed: the window holds them all in flight at once), the
/// call fails after the confirm timeout with a retryable `Unavailable` for the first
/// message and no result after it, and the producer drops that connection: once replies
/// flow again, the next chain goes out on a new connection and is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn window_keeps_many_in_flight_and_confirm_timeout_closes_the_connection() {
    let iso = isolated!("window_timeout");
    let (proxied, broker) = via(&iso.connection.url, 0);
    let relay = Relay::start(broker).await;
    let (proxied, _) = via(&proxied, relay.port);
    let mut config = ProducerConfig::new(
        ConnectionConfig::new(proxied),
        iso.topology.exchange.clone(),
    );
    config.channels = 1;
    config.confirm_timeout = Duration::from_secs(2);
    let p = RabbitMqProducer::new(config).unwrap();
    assert_eq!(p.delivery_timeout(), Some(Duration::from_secs(2)));

    let warm: Vec<Message> = (0..10)
        .map(|i| msg(iso.topic(), "k", &i.to_string()))
        .collect();
    assert!(p.send_ordered(&warm).await.iter().all(Result::is_ok));
    assert_eq!(p.connections_opened(), 1);

    relay.hold();
    let chain: Vec<Message> = (0..100)
        .map(|i| msg(iso.topic(), "k", &i.to_string()))
        .collect();
    let started = tokio::time::Instant::now();
    let results = p.send_ordered(&chain).await;
    let took = started.elapsed();
    assert_eq!(
        results.len(),
        1,
        "stops at the first unconfirmed: {results:?}"
    );
    let e = results[0].as_ref().unwrap_err();
    assert_eq!(
        (e.kind(), e.is_retryable()),
        (ErrorKind::Unavailable, true),
        "{e}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "not before the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(6), "bounded: {took:?}");
    assert_eq!(
        wait_for_depth(&iso.connection.url, &iso.topology.queue, 110).await,
        110,
        "all 100 unconfirmed publishes reached the broker: they were in flight at once"
    );

    relay.release();
    let after: Vec<Message> = (0..10)
        .map(|i| msg(iso.topic(), "k", &i.to_string()))
        .collect();
    let results = p.send_ordered(&after).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(
        p.connections_opened(),
        2,
        "the timed-out connection was abandoned"
    );
}

/// Chains of 4 keys sent concurrently over 2 channels with a window of 16 (so chains share
/// channels and wait for room), while chains with an unroutable message in the middle run
/// too: every good chain is confirmed in full and consumed in order; each bad chain stops
/// at its unroutable message with `NotFound` (the return is matched to its own message, not
/// to a neighbour's confirm).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordered_chains_share_channels_and_returns_find_their_message() {
    const PER_KEY: usize = 300;
    let iso = isolated!("chains");
    let mut config = iso.producer_config();
    config.channels = 2;
    config.window = 16;
    let p = Arc::new(RabbitMqProducer::new(config).unwrap());
    let mut sent: HashMap<String, Vec<MessageId>> = HashMap::new();
    let mut tasks = Vec::new();
    for k in 0..4 {
        let key = format!("key-{k}");
        let chain: Vec<Message> = (0..PER_KEY)
            .map(|i| msg(iso.topic(), &key, &i.to_string()))
            .collect();
        sent.insert(key, chain.iter().map(|m| m.id).collect());
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            (PER_KEY, p.send_ordered(&chain).await)
        }));
    }
    let unroutable = format!("{}.nobody", iso.name);
    for b in 0..4 {
        let key = format!("bad-{b}");
        let mut chain: Vec<Message> = (0..3)
            .map(|i| msg(iso.topic(), &key, &i.to_string()))
            .collect();
        chain.push(msg(&unroutable, &key, "returned"));
        chain.extend((0..3).map(|i| msg(iso.topic(), &key, &i.to_string())));
        let p = p.clone();
        tasks.push(tokio::spawn(
            async move { (3, p.send_ordered(&chain).await) },
        ));
    }
    let mut bad_prefix = 0;
    for t in tasks {
        let (ok, results) = t.await.unwrap();
        for r in &results[..ok] {
            r.as_ref().expect("confirmed");
        }
        if ok < PER_KEY {
            assert_eq!(results.len(), ok + 1, "{results:?}");
            let e = results[ok].as_ref().unwrap_err();
            assert_eq!(
                (e.kind(), e.is_retryable()),
                (ErrorKind::NotFound, false),
                "{e}"
            );
            bad_prefix += ok;
        } else {
            assert_eq!(results.len(), PER_KEY);
        }
    }
    let c = iso.consumer().await.unwrap();
    let mut got: HashMap<String, Vec<MessageId>> = HashMap::new();
    // The good chains, the bad chains' prefixes, and (published before the return was
    // known) possibly their suffixes.
    let expected = 4 * PER_KEY + bad_prefix;
    let mut seen = 0;
    while seen < expected {
        let d = tokio::time::timeout(Duration::from_secs(30), c.receive())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        c.ack(&d).await.unwrap();
        let key = d.message.key.clone().unwrap();
        if key.starts_with("key-") {
            got.entry(key).or_default().push(d.message.id);
            seen += 1;
        } else {
            assert_ne!(
                d.message.payload.as_ref(),
                b"returned",
                "an unroutable message arrived"
            );
            let ids = got.entry(key).or_default();
            seen += usize::from(ids.len() < 3);
            ids.push(d.message.id);
        }
    }
    for (key, ids) in &sent {
        let got = got.get(key).map_or(&[][..], Vec::as_slice);
        assert_eq!(got.len(), ids.len(), "chain {key} complete");
        assert!(got == ids.as_slice(), "chain {key} in order");
    }
}

/// A queue that refuses new messages (`x-max-length` 10 with `x-overflow: reject-publish`,
/// on this test's own queue): a chain of 20 gets 10 `Ok`, then a retryable error (the
/// broker's nack) for the 11th and no result after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_publish_stops_the_chain_with_a_retryable_error() {
    let Some(url) = url_or_skip("nacked_publish_stops_the_chain") else {
        return;
    };
    let queue = unique("nacked");
    let c = Connection::connect(url.expose(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = c.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(10));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    // Default exchange: the topic is the queue name.
    let p =
        RabbitMqProducer::new(ProducerConfig::new(ConnectionConfig::new(url.clone()), "")).unwrap();
    let chain: Vec<Message> = (0..20).map(|i| msg(&queue, "k", &i.to_string())).collect();
    let results = p.send_ordered(&chain).await;
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = c.close(200, "OK".into()).await;
    assert_eq!(results.len(), 11, "{results:?}");
    assert!(results[..10].iter().all(Result::is_ok), "{results:?}");
    let e = results[10].as_ref().unwrap_err();
    assert_eq!(
        (e.kind(), e.is_retryable()),
        (ErrorKind::Unavailable, true),
        "{e}"
    );
}

/// Rough throughput of `send_ordered` (one channel, default window) and of `send_batch`
/// (all channels) against the real broker. Not a benchmark: run by hand with
/// `cargo test -p outbox-rabbitmq --test pipelining -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a rough measurement, not a test"]
async fn rough_throughput() {
    let iso = isolated!("rough_throughput");
    let p = Arc::new(iso.producer());
    const N: usize = 20_000;
    let chain: Vec<Message> = (0..N)
        .map(|i| msg(iso.topic(), "k", &i.to_string()))
        .collect();
    // Raw lapin, same settings (confirm mode, persistent, mandatory), one channel: every
    // publish in flight, then every confirm.
    {
        let c = Connection::connect(iso.connection.url.expose(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = c.create_channel().await.unwrap();
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .unwrap();
        let props = lapin::BasicProperties::default().with_delivery_mode(2);
        let options = lapin::options::BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let mut confirms = Vec::with_capacity(N);
        for m in &chain {
            confirms.push(
                ch.basic_publish(
                    iso.topology.exchange.as_str().into(),
                    iso.topic().into(),
                    options,
                    &m.payload,
                    props.clone(),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
        let t = started.elapsed();
        eprintln!(
            "raw lapin, one channel, all in flight: {N} in {t:?} = {:.0}/s",
            N as f64 / t.as_secs_f64()
        );
        let _ = c.close(200, "OK".into()).await;
    }
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
    let mut tasks = Vec::new();
    for k in 0..100 {
        let p = p.clone();
        let part: Vec<Message> = chain[k * 200..(k + 1) * 200].to_vec();
        tasks.push(tokio::spawn(async move {
            for m in part.chunks(5) {
                assert!(p.send_ordered(m).await.iter().all(Result::is_ok));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let t = started.elapsed();
    eprintln!(
        "100 keys concurrently, chains of 5: {N} in {t:?} = {:.0}/s",
        N as f64 / t.as_secs_f64()
    );
    let started = std::time::Instant::now();
    for m in &chain[..2000] {
        p.send(m).await.unwrap();
    }
    let t = started.elapsed();
    eprintln!(
        "send one at a time: 2000 in {t:?} = {:.0}/s",
        2000.0 / t.as_secs_f64()
    );
    let c = iso.consumer().await.unwrap();
    drop(c);
}
