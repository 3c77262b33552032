//! Where to send: policies that pick one instance from a snapshot, with no
//! I/O, plus the [`PushRouter`](push_router::PushRouter) that glues a policy
//! to a [`Client`](crate::component::client::Client) and the request plane.

pub mod load;
pub mod occupancy;
pub mod push_router;

use crate::instance::Instance;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How a [`push_router::PushRouter`] chooses an instance for `generate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RouterMode {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// A uniformly random instance.
    Random,
    /// Two random instances; the less loaded wins.
    PowerOfTwo,
    /// The least loaded instance.
    LeastLoaded,
    /// The caller names the instance with `direct(request, instance_id)`.
    Direct,
    /// KV-cache aware: the caller passes a per-request policy that knows the
    /// prompt's cached prefix on each instance (`generate_routed_with`);
    /// plain `generate` falls back to least loaded.
    Kv,
}

impl RouterMode {
    const CHOICES: &'static str = "round_robin, random, power_of_two, least_loaded, kv, direct";

    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::RoundRobin => "round_robin",
            RouterMode::Random => "random",
            RouterMode::PowerOfTwo => "power_of_two",
            RouterMode::LeastLoaded => "least_loaded",
            RouterMode::Direct => "direct",
            RouterMode::Kv => "kv",
        }
    }
}

impl FromStr for RouterMode {
    type Err = UnknownRouterMode;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().replace('-', "_").as_str() {
            "round_robin" => Ok(RouterMode::RoundRobin),
            "random" => Ok(RouterMode::Random),
            "power_of_two" | "p2c" => Ok(RouterMode::PowerOfTwo),
            "least_loaded" => Ok(RouterMode::LeastLoaded),
            "direct" => Ok(RouterMode::Direct),
            "kv" => Ok(RouterMode::Kv),
            _ => Err(UnknownRouterMode(text.to_string())),
        }
    }
}

/// A router mode name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown router mode {0:?}; expected one of {choices}", choices = RouterMode::CHOICES)]
pub struct UnknownRouterMode(String);

/// What a policy may know about the instances' load.
pub trait LoadView {
    /// Requests in flight (the occupancy score) of `id`.
    fn load(&self, id: u64) -> u64;
    /// False when `id` must not be chosen now (ejected, or busy).
    fn available(&self, id: u64) -> bool;
    /// The available instance with the lowest load among those `allowed` accepts.
    fn least_loaded(&self, allowed: &dyn Fn(u64) -> bool) -> Option<u64>;
}

/// Picks an instance from a snapshot sorted by instance id. Pure: no I/O,
/// no clock; O(1) or O(log n) per call, never a copy of the fleet.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// The index of the chosen instance; `None` when none is available.
    fn select(&self, instances: &[Instance], loads: &dyn LoadView) -> Option<usize>;
}

/// How many candidates a sampling policy tries before it gives up on
/// finding an available one at random (it then falls back to a scan).
const SAMPLE_TRIES: usize = 8;

/// Each instance in turn. The turn of an unavailable instance goes to a
/// random available one: giving it to the next in line would double that
/// neighbour's share for as long as the other is ejected or busy.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn select(&self, instances: &[Instance], loads: &dyn LoadView) -> Option<usize> {
        let n = instances.len();
        if n == 0 {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % n;
        if loads.available(instances[turn].instance_id) {
            return Some(turn);
        }
        sample(instances, loads).or_else(|| first_available(instances, loads))
    }
}

/// A uniformly random available instance.
#[derive(Debug, Default)]
pub struct Random;

impl Policy for Random {
    fn select(&self, instances: &[Instance], loads: &dyn LoadView) -> Option<usize> {
        sample(instances, loads).or_else(|| first_available(instances, loads))
    }
}

/// Two random available instances; the one with the lower load wins (ties go
/// to the first). Keeps most of least-loaded's benefit while several routers
/// do not all herd onto the same "least loaded" instance.
#[derive(Debug, Default)]
pub struct PowerOfTwo;

impl Policy for PowerOfTwo {
    fn select(&self, instances: &[Instance], loads: &dyn LoadView) -> Option<usize> {
        let first = sample(instances, loads).or_else(|| first_available(instances, loads))?;
        let n = instances.len();
        // A second index drawn from the other n-1, so it always differs from the first.
        let second = (n > 1)
            .then(|| {
                (0..SAMPLE_TRIES)
                    .map(|_| {
                        let j = rand::random_range(0..n - 1);
                        if j >= first { j + 1 } else { j }
                    })
                    .find(|&i| loads.available(instances[i].instance_id))
            })
            .flatten();
        Some(match second {
            Some(second) if loads.load(instances[second].instance_id) < loads.load(instances[first].instance_id) => {
                second
            }
            _ => first,
        })
    }
}

/// The available instance with the fewest requests in flight.
#[derive(Debug, Default)]
pub struct LeastLoaded;

impl Policy for LeastLoaded {
    fn select(&self, instances: &[Instance], loads: &dyn LoadView) -> Option<usize> {
        let position = |id: u64| instances.binary_search_by_key(&id, |i| i.instance_id).ok();
        let chosen = loads.least_loaded(&|id| position(id).is_some())?;
        position(chosen)
    }
}

fn sample(instances: &[Instance], loads: &dyn LoadView) -> Option<usize> {
    if instances.is_empty() {
        return None;
    }
    (0..SAMPLE_TRIES)
        .map(|_| rand::random_range(0..instances.len()))
        .find(|&i| loads.available(instances[i].instance_id))
}

/// Fallback when random tries found nothing: most instances are unavailable.
fn first_available(instances: &[Instance], loads: &dyn LoadView) -> Option<usize> {
    instances.iter().position(|i| loads.available(i.instance_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_plane::Transport;

    fn fleet(n: u64) -> Vec<Instance> {
        (0..n)
            .map(|id| Instance {
                namespace: "ns".into(),
                component: "c".into(),
                endpoint: "e".into(),
                instance_id: id,
                transport: Transport::Tcp(format!("127.0.0.1:{}", 1000 + id)),
            })
            .collect()
    }

    /// Loads given as a table; unavailable ids listed.
    struct Table {
        loads: Vec<u64>,
        unavailable: Vec<u64>,
    }

    impl LoadView for Table {
        fn load(&self, id: u64) -> u64 {
            self.loads[id as usize]
        }
        fn available(&self, id: u64) -> bool {
            !self.unavailable.contains(&id)
        }
        fn least_loaded(&self, allowed: &dyn Fn(u64) -> bool) -> Option<u64> {
            (0..self.loads.len() as u64)
                .filter(|id| allowed(*id) && self.available(*id))
                .min_by_key(|id| (self.load(*id), *id))
        }
    }

    fn idle(n: usize) -> Table {
        Table {
            loads: vec![0; n],
            unavailable: vec![],
        }
    }

    #[test]
    fn round_robin_visits_every_instance_evenly_and_skips_unavailable_ones() {
        let policy = RoundRobin::default();
        let instances = fleet(3);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[policy.select(&instances, &idle(3)).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
        let one_down = Table {
            loads: vec![0; 3],
            unavailable: vec![1],
        };
        for _ in 0..30 {
            assert_ne!(policy.select(&instances, &one_down), Some(1));
        }
    }

    #[test]
    fn round_robin_spreads_an_unavailable_instance_turns_instead_of_doubling_its_neighbour() {
        let policy = RoundRobin::default();
        let instances = fleet(4);
        let first_down = Table {
            loads: vec![0; 4],
            unavailable: vec![0],
        };
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[policy.select(&instances, &first_down).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0);
        // Even share is 1333 each; a next-in-line fallback would give instance 1 2000.
        assert!(counts[1..].iter().all(|&c| (1150..1550).contains(&c)), "{counts:?}");
    }

    #[test]
    fn random_reaches_every_instance() {
        let instances = fleet(4);
        let mut seen = [false; 4];
        for _ in 0..1000 {
            seen[Random.select(&instances, &idle(4)).unwrap()] = true;
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }

    #[test]
    fn power_of_two_never_picks_the_more_loaded_of_its_pair_and_never_the_worst() {
        let instances = fleet(3);
        let loads = Table {
            loads: vec![5, 0, 9],
            unavailable: vec![],
        };
        for _ in 0..500 {
            assert_ne!(
                PowerOfTwo.select(&instances, &loads),
                Some(2),
                "the most loaded instance can never win a pair"
            );
        }
        // With two instances the pair is always both: the idle one wins.
        let pair = fleet(2);
        let loads = Table {
            loads: vec![3, 1],
            unavailable: vec![],
        };
        for _ in 0..100 {
            assert_eq!(PowerOfTwo.select(&pair, &loads), Some(1));
        }
    }

    #[test]
    fn least_loaded_picks_the_minimum_and_breaks_ties_by_id() {
        let instances = fleet(4);
        let loads = Table {
            loads: vec![2, 1, 1, 0],
            unavailable: vec![3],
        };
        assert_eq!(LeastLoaded.select(&instances, &loads), Some(1));
    }

    #[test]
    fn no_instances_or_none_available_means_no_choice() {
        let policies: [&dyn Policy; 4] = [&RoundRobin::default(), &Random, &PowerOfTwo, &LeastLoaded];
        let all_down = Table {
            loads: vec![0; 3],
            unavailable: vec![0, 1, 2],
        };
        for policy in policies {
            assert_eq!(policy.select(&[], &idle(0)), None);
            assert_eq!(policy.select(&fleet(3), &all_down), None);
        }
    }

    #[test]
    fn modes_parse_with_a_clear_error() {
        assert_eq!("round-robin".parse::<RouterMode>().unwrap(), RouterMode::RoundRobin);
        assert_eq!("RANDOM".parse::<RouterMode>().unwrap(), RouterMode::Random);
        let err = "fastest".parse::<RouterMode>().unwrap_err().to_string();
        assert!(
            err.contains("fastest") && err.contains("power_of_two, least_loaded"),
            "{err}"
        );
        assert_eq!("p2c".parse::<RouterMode>().unwrap(), RouterMode::PowerOfTwo);
    }
}
