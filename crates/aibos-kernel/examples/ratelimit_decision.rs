//! The rate limiter's decision cost (`bench/ratelimit.sh` runs it).
//!
//! In process: one request decided by a user and a tenant policy (both keys
//! hashed from their ids, the shards locked, both TATs read and moved), over
//! 10 000 users of 100 tenants, N decisions per run, the median of 7 runs in
//! ns per decision. With a Redis URL: one decision (one script call, both
//! policies) against one PING on the same connection, one at a time (the
//! round trip) and 64 at once (pipelined on the one multiplexed connection).
//!
//!     cargo run --release -p aibos-kernel --example ratelimit_decision -- [redis://127.0.0.1:6379]

use std::time::{Duration, Instant};

use aibos_kernel::ratelimit::{
    LocalLimiter, MICROS_PER_MINUTE, NANOS_PER_MINUTE, POLICIES_MAX, Quota, RedisBackend,
};

const USERS: usize = 10_000;
const TENANTS: usize = 100;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn in_process() -> f64 {
    let limiter = LocalLimiter::default();
    let tenants: Vec<String> = (0..TENANTS)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let users: Vec<(usize, String)> = (0..USERS)
        .map(|i| (i % TENANTS, uuid::Uuid::now_v7().to_string()))
        .collect();
    // Limits that never refuse: every decision moves both TATs.
    let quota = Quota::per_minute(1_000_000, 1_000_000, NANOS_PER_MINUTE);
    let mut out = [aibos_kernel::ratelimit::Outcome {
        admitted: false,
        new_tat: 0,
        remaining: 0,
        reset: 0,
        retry_after: 0,
    }; POLICIES_MAX];
    const N: usize = 2_000_000;
    let mut runs = Vec::new();
    for _ in 0..7 {
        let started = Instant::now();
        let mut admitted = 0usize;
        for i in 0..N {
            let (tenant, subject) = &users[i % USERS];
            let tenant = tenants[*tenant].as_bytes();
            let policies = [
                (limiter.key(&[b"user", tenant, subject.as_bytes()]), quota),
                (limiter.key(&[b"tenant", tenant]), quota),
            ];
            admitted += usize::from(limiter.decide(&policies, limiter.now(), &mut out));
        }
        assert_eq!(admitted, N);
        runs.push(started.elapsed().as_nanos() as f64 / N as f64);
    }
    median(runs)
}

async fn on_redis(url: &str) {
    let backend = RedisBackend::new(url, Duration::from_secs(2)).expect("a Redis URL");
    backend
        .ping(Duration::from_secs(2))
        .await
        .expect("Redis answers");
    let run = uuid::Uuid::now_v7().simple().to_string();
    let quota = Quota::per_minute(1_000_000, 1_000_000, MICROS_PER_MINUTE);
    let keys = move |i: usize| {
        vec![
            (
                format!("aibos-bench-{run}:rl:user:t{}:u{i}", i % TENANTS),
                quota,
            ),
            (
                format!("aibos-bench-{run}:rl:tenant:t{}", i % TENANTS),
                quota,
            ),
        ]
    };
    let mut out = [aibos_kernel::ratelimit::Outcome {
        admitted: false,
        new_tat: 0,
        remaining: 0,
        reset: 0,
        retry_after: 0,
    }; POLICIES_MAX];
    const N: usize = 5_000;
    let (mut pings, mut decisions) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..N {
            backend.ping(Duration::from_secs(2)).await.expect("PONG");
        }
        pings.push(started.elapsed().as_micros() as f64 / N as f64);
        let started = Instant::now();
        for i in 0..N {
            let policies = keys(i % USERS);
            assert!(
                backend
                    .decide(&policies, Duration::from_secs(2), &mut out)
                    .await
                    .expect("a decision")
            );
        }
        decisions.push(started.elapsed().as_micros() as f64 / N as f64);
    }
    let (ping, decision) = (median(pings), median(decisions));
    println!("redis_ping_round_trip_us {ping:.1}");
    println!("redis_decision_round_trip_us {decision:.1}");
    println!("redis_decision_over_ping {:.2}", decision / ping);

    // 64 at once: the multiplexed connection pipelines them.
    let backend = std::sync::Arc::new(backend);
    let concurrent = |decide: bool| {
        let backend = backend.clone();
        let keys = keys.clone();
        async move {
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for worker in 0..64 {
                let (backend, keys) = (backend.clone(), keys.clone());
                tasks.spawn(async move {
                    let mut out = out;
                    for i in 0..N / 16 {
                        if decide {
                            let policies = keys(worker * 1_000 + i);
                            backend
                                .decide(&policies, Duration::from_secs(2), &mut out)
                                .await
                                .expect("a decision");
                        } else {
                            backend.ping(Duration::from_secs(2)).await.expect("PONG");
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
            (64 * (N / 16)) as f64 / started.elapsed().as_secs_f64()
        }
    };
    let pings_per_second = concurrent(false).await;
    let decisions_per_second = concurrent(true).await;
    println!("redis_pipelined_pings_per_second {pings_per_second:.0}");
    println!("redis_pipelined_decisions_per_second {decisions_per_second:.0}");
    println!(
        "redis_pipelined_decisions_over_pings {:.2}",
        decisions_per_second / pings_per_second
    );
}

fn main() {
    println!("in_process_decision_ns {:.0}", in_process());
    if let Some(url) = std::env::args().nth(1) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(on_redis(&url));
    }
}
