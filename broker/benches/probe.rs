//! Probe latency and round trips on one local Redis, for 1 … 10,000 queues × 4 priorities, and
//! the cost of the server-side scans (the unacked hash, and the walk of the lists for scheduled
//! tasks and latency markers). Not a test: run `cargo bench -p celery-broker --bench probe` and
//! read the Markdown tables it prints.
//!
//! Round trips and commands are counted by a TCP proxy between the probe and Redis that parses
//! RESP in both directions: a round trip starts whenever the client sends a command while no reply
//! is outstanding. Latency is measured without the proxy.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celery_broker::{Broker, BrokerConfig, TransportOptions};
use e2e_harness::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const QUEUE_COUNTS: [usize; 4] = [1, 100, 1_000, 10_000];
const UNACKED_COUNTS: [usize; 4] = [0, 1_000, 10_000, 50_000];
const WAITING_COUNTS: [usize; 4] = [0, 1_000, 10_000, 100_000];

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let redis = RedisServer::start().expect("redis-server");
    let mut con = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let options = TransportOptions::default();

    println!("## Probe of N queues × 4 priority lists (one message in each list)\n");
    println!("| queues | lists | p50 | p99 | round trips / poll | commands / poll |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in QUEUE_COUNTS {
        let queues: Vec<String> = (0..n).map(|i| format!("queue-{i}")).collect();
        fill_queues(&mut con, &options, &queues).await;
        let (p50, p99) = latency(&redis.url(), &queues).await;
        let (trips, commands) = round_trips(redis.port(), &queues).await;
        println!("| {n} | {} | {} | {} | {trips:.2} | {commands:.0} |", n * 4, ms(p50), ms(p99));
    }

    println!("\n## Probe of 1,000 queues with U unacked messages (~1.5 KB each, default scan limit 2,000)\n");
    println!("| unacked | p50 (no ETA) | p99 (no ETA) | p50 (all with a future ETA) | p99 (all with a future ETA) |");
    println!("|---:|---:|---:|---:|---:|");
    let queues: Vec<String> = (0..1_000).map(|i| format!("queue-{i}")).collect();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
    for u in UNACKED_COUNTS {
        fill_unacked(&mut con, &options, u, false).await;
        let (p50, p99) = latency(&redis.url(), &queues).await;
        fill_unacked(&mut con, &options, u, true).await;
        let (eta50, eta99) = latency(&redis.url(), &queues).await;
        println!("| {u} | {} | {} | {} | {} |", ms(p50), ms(p99), ms(eta50), ms(eta99));
    }

    println!(
        "\n## Probe of 1,000 queues, W messages waiting in 10 of them (~1.5 KB each, 1 in 10 with a future ETA, default list scan limit 1,000)\n"
    );
    println!("| waiting | p50 | p99 |");
    println!("|---:|---:|---:|");
    fill_unacked(&mut con, &options, 0, false).await;
    for w in WAITING_COUNTS {
        fill_waiting(&mut con, &options, &queues, w).await;
        let (p50, p99) = latency(&redis.url(), &queues).await;
        println!("| {w} | {} | {} |", ms(p50), ms(p99));
    }
}

/// A Celery protocol 2 message in kombu's JSON layout, ~1.5 KB; `eta` as Celery writes it.
fn celery_message(tag: &str, queue: &str, eta: Option<&str>) -> String {
    let body = "A".repeat(1_200);
    let eta = eta.map_or_else(|| "null".to_owned(), |e| format!("\"{e}\""));
    format!(
        r#"{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {{"lang": "py", "task": "tasks.work", "id": "{tag}", "shadow": null, "eta": {eta}, "expires": null, "retries": 0}}, "properties": {{"correlation_id": "{tag}", "delivery_info": {{"exchange": "", "routing_key": "{queue}"}}, "priority": 0, "body_encoding": "base64", "delivery_tag": "{tag}"}}}}"#
    )
}

/// `count` messages spread over the first 10 of `queues` (one list each), every tenth with an ETA
/// an hour ahead.
async fn fill_waiting(
    con: &mut redis::aio::MultiplexedConnection,
    options: &TransportOptions,
    queues: &[String],
    count: usize,
) {
    for queue in &queues[..10] {
        let _: () = redis::cmd("DEL").arg(options.priority_keys(queue)).query_async(con).await.unwrap();
    }
    let eta = "2099-01-01T00:00:00.000000+00:00";
    for chunk in (0..count).collect::<Vec<_>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let queue = &queues[i % 10];
            let tag = format!("{i:08x}-0000-4000-8000-000000000000");
            let message = celery_message(&tag, queue, (i % 10 == 0).then_some(eta));
            pipe.cmd("LPUSH").arg(queue).arg(message).ignore();
        }
        let _: () = pipe.query_async(con).await.unwrap();
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

async fn fill_queues(con: &mut redis::aio::MultiplexedConnection, options: &TransportOptions, queues: &[String]) {
    let _: () = redis::cmd("FLUSHALL").query_async(con).await.unwrap();
    let mut pipe = redis::pipe();
    for queue in queues {
        for key in options.priority_keys(queue) {
            pipe.cmd("LPUSH").arg(key).arg("{\"body\": \"task\"}").ignore();
        }
    }
    let _: () = pipe.query_async(con).await.unwrap();
}

/// `count` unacked entries in kombu's format, spread over 50 queues; with `eta`, each held for an
/// ETA an hour ahead (what a worker holding scheduled tasks leaves there).
async fn fill_unacked(
    con: &mut redis::aio::MultiplexedConnection,
    options: &TransportOptions,
    count: usize,
    eta: bool,
) {
    let _: () =
        redis::cmd("DEL").arg(options.unacked_key()).arg(options.unacked_index_key()).query_async(con).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let eta = eta.then_some("2099-01-01T00:00:00.000000+00:00");
    for chunk in (0..count).collect::<Vec<_>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let queue = format!("queue-{}", i % 50);
            let tag = format!("{i:08x}-0000-4000-8000-000000000000");
            let value = format!(r#"[{}, "{queue}", "{queue}"]"#, celery_message(&tag, &queue, eta));
            pipe.cmd("HSET").arg(options.unacked_key()).arg(&tag).arg(value).ignore();
            pipe.cmd("ZADD").arg(options.unacked_index_key()).arg(now).arg(&tag).ignore();
        }
        let _: () = pipe.query_async(con).await.unwrap();
    }
}

/// p50 and p99 of the probe's wall time over enough polls to be stable.
async fn latency(url: &str, queues: &[String]) -> (Duration, Duration) {
    let broker = Broker::new(BrokerConfig::new(url)).unwrap();
    for _ in 0..10 {
        broker.probe(queues).await.unwrap();
    }
    let polls = if queues.len() >= 10_000 { 100 } else { 500 };
    let mut times = Vec::with_capacity(polls);
    for _ in 0..polls {
        let start = Instant::now();
        broker.probe(queues).await.unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    (times[polls / 2], times[polls * 99 / 100])
}

/// Mean round trips and commands per poll (after a warm-up poll that loads the scripts), through
/// a counting proxy. Commands are what the probe sends (2 `EVALSHA`, 4 `INFO`), not the
/// calls the scripts make inside Redis.
async fn round_trips(redis_port: u16, queues: &[String]) -> (f64, f64) {
    let counter = Arc::new(Mutex::new(Turns::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    tokio::spawn(proxy(listener, redis_port, counter.clone()));
    let broker = Broker::new(BrokerConfig::new(format!("redis://127.0.0.1:{proxy_port}/0"))).unwrap();
    broker.probe(queues).await.unwrap();
    let (trips, requests) = {
        let t = counter.lock().unwrap();
        (t.round_trips, t.requests)
    };
    let polls = 10;
    for _ in 0..polls {
        broker.probe(queues).await.unwrap();
    }
    let t = counter.lock().unwrap();
    let per_poll = |n: u64| n as f64 / f64::from(polls);
    (per_poll(t.round_trips - trips), per_poll(t.requests - requests))
}

#[derive(Default)]
struct Turns {
    requests: u64,
    replies: u64,
    round_trips: u64,
}

async fn proxy(listener: TcpListener, upstream: u16, turns: Arc<Mutex<Turns>>) {
    loop {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(("127.0.0.1", upstream)).await.unwrap();
        let (client_rx, client_tx) = client.into_split();
        let (server_rx, server_tx) = server.into_split();
        let up = turns.clone();
        tokio::spawn(pump(client_rx, server_tx, move |n| {
            let mut t = up.lock().unwrap();
            if n > 0 && t.requests == t.replies {
                t.round_trips += 1;
            }
            t.requests += n;
        }));
        let down = turns.clone();
        tokio::spawn(pump(server_rx, client_tx, move |n| down.lock().unwrap().replies += n));
    }
}

/// Copies `rx` to `tx`, reporting how many complete RESP values each chunk completed *before*
/// forwarding it (so a reply is counted before the client can react to it).
async fn pump(
    mut rx: tokio::net::tcp::OwnedReadHalf,
    mut tx: tokio::net::tcp::OwnedWriteHalf,
    mut on_values: impl FnMut(u64),
) {
    let mut pending = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        let mut offset = 0;
        let mut values = 0;
        while let Some(len) = resp_value_len(&pending[offset..]) {
            offset += len;
            values += 1;
        }
        pending.drain(..offset);
        on_values(values);
        if tx.write_all(&chunk[..n]).await.is_err() {
            return;
        }
    }
}

/// Length of the complete RESP2/RESP3 value at the start of `buf`, if it is complete.
fn resp_value_len(buf: &[u8]) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let after = line_end + 2;
    let number = || std::str::from_utf8(&buf[1..line_end]).ok()?.parse::<i64>().ok();
    match *buf.first()? {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Some(after),
        b'$' | b'!' | b'=' => match number()? {
            n if n < 0 => Some(after),
            n => {
                let end = after + usize::try_from(n).ok()? + 2;
                (buf.len() >= end).then_some(end)
            }
        },
        kind @ (b'*' | b'~' | b'>' | b'%' | b'|') => {
            let n = number()?;
            let items = if matches!(kind, b'%' | b'|') { n * 2 } else { n };
            let mut offset = after;
            for _ in 0..items.max(0) {
                offset += resp_value_len(&buf[offset..])?;
            }
            Some(offset)
        }
        _ => None,
    }
}
