//! The cost of one routing decision with 10, 1,000 and 10,000 instances, for
//! each policy over a live occupancy table (targets: ≤ 1 µs at 1k, ≤ 5 µs at
//! 10k).
//!
//! ```text
//! cargo bench -p switchyard-runtime --bench routing
//! ```

use criterion::{BenchmarkId, Criterion};
use switchyard_runtime::instance::Instance;
use switchyard_runtime::request_plane::Transport;
use switchyard_runtime::routing::occupancy::Occupancy;
use switchyard_runtime::routing::{LeastLoaded, LoadView, Policy, PowerOfTwo, Random, RoundRobin};
use tokio::time::Instant;

/// The view a router gives its policy: loads and ejections from the table.
struct View<'a> {
    occupancy: &'a Occupancy,
    now: Instant,
}

impl LoadView for View<'_> {
    fn load(&self, id: u64) -> u64 {
        self.occupancy.load(id)
    }
    fn available(&self, id: u64) -> bool {
        self.occupancy.is_available(id, self.now)
    }
    fn least_loaded(&self, allowed: &dyn Fn(u64) -> bool) -> Option<u64> {
        self.occupancy.least_loaded(|id, _| allowed(id), self.now)
    }
}

fn fleet(n: u64) -> Vec<Instance> {
    (0..n)
        .map(|id| Instance {
            namespace: "bench".into(),
            component: "worker".into(),
            endpoint: "generate".into(),
            instance_id: id,
            transport: Transport::Tcp(format!("10.0.0.1:{}", 1000 + id % 60000)),
        })
        .collect()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("select");
    for n in [10u64, 1_000, 10_000] {
        let instances = fleet(n);
        let occupancy = Occupancy::new();
        let ids: Vec<u64> = instances.iter().map(|i| i.instance_id).collect();
        occupancy.sync(&ids);
        // Some load, so least_loaded and p2c have something to compare.
        let _guards: Vec<_> = (0..n)
            .filter(|id| id % 3 == 0)
            .map(|id| occupancy.acquire(id))
            .collect();
        let policies: [(&str, Box<dyn Policy>); 4] = [
            ("round_robin", Box::new(RoundRobin::default())),
            ("random", Box::new(Random)),
            ("power_of_two", Box::new(PowerOfTwo)),
            ("least_loaded", Box::new(LeastLoaded)),
        ];
        for (name, policy) in &policies {
            group.bench_with_input(BenchmarkId::new(*name, n), &n, |b, _| {
                b.iter(|| {
                    let view = View {
                        occupancy: &occupancy,
                        now: Instant::now(),
                    };
                    std::hint::black_box(policy.select(&instances, &view))
                })
            });
        }
    }
    group.finish();
    c.final_summary();
}
