//! Anchor for the login benchmark: the raw Argon2id hash rate of the kernel's
//! own parameters, on N threads for S seconds (`bench/login.sh` runs it).
//!
//!     cargo run --release -p aibos-kernel --example argon2_rate -- 2 10

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let seconds: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    let phc =
        aibos_kernel::identity::password::hash_now(b"correct horse battery staple").expect("hash");
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (done, stop, phc) = (done.clone(), stop.clone(), phc.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A login verifies: the same work as verify_now on a real hash.
                    assert!(aibos_kernel::identity::password::verify_now(
                        b"correct horse battery staple",
                        Some(&phc)
                    ));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("{:.1}", done.load(Ordering::Relaxed) as f64 / elapsed);
}
