//! The subscriber's sequence rules, with no I/O: what a live sequence
//! number means given the last one delivered, and which replayed batches
//! fill a hole. The subscriber thread does the sockets; this decides.

/// What a batch arriving on the live (SUB) socket means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// The one expected: deliver it.
    Next,
    /// Batches `[from, seq)` were not seen: fill them (replay) before this one.
    /// `from` is 0 for the first batch a subscriber sees.
    Missing { from: u64 },
    /// The sequence went backwards: the engine restarted. The consumer is
    /// told, then this batch counts as the first one of a new engine.
    Restarted,
}

/// Classifies `seq` given the last sequence number delivered (`None`
/// before the first).
///
/// Any step back on the live socket is a restart, not a duplicate: a PUB
/// socket sends each message at most once and in order, also across
/// reconnections, and replay (the only source of repeats) is stitched in
/// by [`ReplayWindow`], which never goes past the batch that triggered it.
/// Taking a restart for a duplicate would keep a dead process's blocks in
/// the index; taking a duplicate for a restart only costs a re-learn.
pub(crate) fn classify(last: Option<u64>, seq: u64) -> Arrival {
    match last {
        None if seq == 0 => Arrival::Next,
        None => Arrival::Missing { from: 0 },
        Some(last) if seq <= last => Arrival::Restarted,
        Some(last) if seq == last + 1 => Arrival::Next,
        Some(last) => Arrival::Missing { from: last + 1 },
    }
}

/// The hole `[next, end)` a replay is filling. Replayed batches are offered
/// in the order they arrive; each is taken at most once, in order.
#[derive(Debug)]
pub(crate) struct ReplayWindow {
    next: u64,
    end: u64,
}

/// What to do with one replayed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Deliver it; first deliver `Lost` for `lost_before` when the
    /// publisher no longer held the batches before it.
    Take { lost_before: Option<(u64, u64)> },
    /// Already delivered, or at or past the end of the hole (it comes, or
    /// came, on the live socket).
    Skip,
}

impl ReplayWindow {
    pub(crate) fn new(from: u64, end: u64) -> Self {
        ReplayWindow { next: from, end }
    }

    pub(crate) fn offer(&mut self, seq: u64) -> Offer {
        if seq < self.next || seq >= self.end {
            return Offer::Skip;
        }
        let lost_before = (seq > self.next).then_some((self.next, seq));
        self.next = seq + 1;
        Offer::Take { lost_before }
    }

    /// What the replay did not cover, `[from, to)`, if anything.
    pub(crate) fn uncovered(&self) -> Option<(u64, u64)> {
        (self.next < self.end).then_some((self.next, self.end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_batch_at_zero_is_next_later_ones_miss_the_history() {
        assert_eq!(classify(None, 0), Arrival::Next);
        assert_eq!(classify(None, 5), Arrival::Missing { from: 0 });
    }

    #[test]
    fn a_jump_forward_is_a_gap_from_the_one_after_last() {
        assert_eq!(classify(Some(4), 5), Arrival::Next);
        assert_eq!(classify(Some(4), 9), Arrival::Missing { from: 5 });
    }

    #[test]
    fn any_step_back_on_the_live_socket_is_a_restart() {
        assert_eq!(classify(Some(4), 0), Arrival::Restarted);
        assert_eq!(classify(Some(4), 3), Arrival::Restarted);
        assert_eq!(classify(Some(4), 4), Arrival::Restarted);
    }

    #[test]
    fn a_replay_fills_the_hole_once_in_order_and_reports_what_it_lacked() {
        let mut w = ReplayWindow::new(5, 9);
        assert_eq!(w.offer(3), Offer::Skip, "before the hole: already delivered");
        assert_eq!(
            w.offer(6),
            Offer::Take {
                lost_before: Some((5, 6))
            }
        );
        assert_eq!(w.offer(6), Offer::Skip, "a duplicate");
        assert_eq!(w.offer(7), Offer::Take { lost_before: None });
        assert_eq!(w.offer(9), Offer::Skip, "the live batch that made the hole");
        assert_eq!(w.uncovered(), Some((8, 9)));
        assert_eq!(w.offer(8), Offer::Take { lost_before: None });
        assert_eq!(w.uncovered(), None);
    }
}
