//! Where to send: policies that pick one instance from a snapshot, with no
//! I/O, plus the [`PushRouter`](push_router::PushRouter) that glues a policy
//! to a [`Client`](crate::component::client::Client) and the request plane.

pub mod push_router;

use crate::component::Instance;
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
    /// The caller names the instance with `direct(request, instance_id)`.
    Direct,
}

impl RouterMode {
    const CHOICES: &'static str = "round_robin, random, direct";

    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::RoundRobin => "round_robin",
            RouterMode::Random => "random",
            RouterMode::Direct => "direct",
        }
    }
}

impl FromStr for RouterMode {
    type Err = UnknownRouterMode;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().replace('-', "_").as_str() {
            "round_robin" => Ok(RouterMode::RoundRobin),
            "random" => Ok(RouterMode::Random),
            "direct" => Ok(RouterMode::Direct),
            _ => Err(UnknownRouterMode(text.to_string())),
        }
    }
}

/// A router mode name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown router mode {0:?}; expected one of {choices}", choices = RouterMode::CHOICES)]
pub struct UnknownRouterMode(String);

/// Picks an instance from a snapshot. Pure: no I/O, no clock, O(1).
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// The index of the chosen instance, `None` when `instances` is empty.
    fn select(&self, instances: &[Instance]) -> Option<usize>;
}

/// Each instance in turn. The counter is shared by all callers of one router.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn select(&self, instances: &[Instance]) -> Option<usize> {
        if instances.is_empty() {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % instances.len())
    }
}

/// A uniformly random instance.
#[derive(Debug, Default)]
pub struct Random;

impl Policy for Random {
    fn select(&self, instances: &[Instance]) -> Option<usize> {
        if instances.is_empty() {
            return None;
        }
        Some(rand::random_range(0..instances.len()))
    }
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

    #[test]
    fn round_robin_visits_every_instance_evenly() {
        let policy = RoundRobin::default();
        let instances = fleet(3);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[policy.select(&instances).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn random_reaches_every_instance() {
        let instances = fleet(4);
        let mut seen = [false; 4];
        for _ in 0..1000 {
            seen[Random.select(&instances).unwrap()] = true;
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }

    #[test]
    fn no_instances_no_choice() {
        assert_eq!(RoundRobin::default().select(&[]), None);
        assert_eq!(Random.select(&[]), None);
    }

    #[test]
    fn modes_parse_with_a_clear_error() {
        assert_eq!("round-robin".parse::<RouterMode>().unwrap(), RouterMode::RoundRobin);
        assert_eq!("RANDOM".parse::<RouterMode>().unwrap(), RouterMode::Random);
        let err = "fastest".parse::<RouterMode>().unwrap_err().to_string();
        assert!(
            err.contains("fastest") && err.contains("round_robin, random, direct"),
            "{err}"
        );
    }
}
