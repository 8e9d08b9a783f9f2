//! Allocation over 10,000 bindings on one instance (`cargo bench --bench allocate`).
//! A benchmark, never a test: it reports, it asserts nothing about time.

use std::hint::black_box;
use std::time::Instant;

use cloudsql_binder::budget::{PoolRequest, allocate};

fn requests(n: u32) -> Vec<PoolRequest> {
    (0..n)
        .map(|i| PoolRequest {
            key: format!("ns-{}/binding-{i}", i % 97),
            max_pods: 1 + (i * 7919) % 40,
            min_per_pod: 1 + i % 3,
            max_per_pod: 5 + (i * 31) % 20,
            weight: 1 + i % 4,
        })
        .collect()
}

fn main() {
    let n = 10_000;
    let reqs = requests(n);
    let needed_min: u64 = reqs
        .iter()
        .map(|r| u64::from(r.max_pods) * u64::from(r.min_per_pod))
        .sum();
    let requested: u64 = reqs
        .iter()
        .map(|r| u64::from(r.max_pods) * u64::from(r.max_per_pod))
        .sum();
    // Between the minimums and the maximums, so the fair share has work to do.
    let usable = u32::try_from((needed_min + requested) / 2).unwrap_or(u32::MAX);
    for _ in 0..3 {
        let _ = black_box(allocate(usable, &reqs));
    }
    let runs = 21;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let allocation = black_box(allocate(black_box(usable), black_box(&reqs)));
        times.push(start.elapsed());
        assert!(allocation.is_ok());
    }
    times.sort();
    println!(
        "allocate: {n} bindings, {usable} usable connections: median {:?}, min {:?}, max {:?} over {runs} runs",
        times[runs / 2],
        times[0],
        times[runs - 1]
    );
}
