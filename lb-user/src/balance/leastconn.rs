//! `balance: leastconn`: the server with the fewest current sessions for its weight. Equal
//! ones take turns, so a burst of new flows on idle servers still spreads (as HAProxy's
//! leastconn does).
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::lighter;

#[derive(Default)]
pub struct LeastConn {
    /// Where the scan for the lightest server starts: ties go to the first one found.
    next: AtomicUsize,
}

impl LeastConn {
    /// `weights` and `active`: each server's weight and current sessions, same order.
    pub fn pick(&self, weights: &[u32], active: &[u32]) -> Option<usize> {
        let n = weights.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed) % n;
        let mut best: Option<usize> = None;
        for i in (0..n).map(|k| (start + k) % n) {
            if weights[i] == 0 {
                continue;
            }
            if best.is_none_or(|b| lighter(active[i], weights[i], active[b], weights[b])) {
                best = Some(i);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_server_gets_the_new_flow() {
        let lc = LeastConn::default();
        for _ in 0..10 {
            assert_eq!(lc.pick(&[1, 1, 1], &[4, 0, 2]), Some(1));
        }
        // Per unit of weight: 4/4 is lighter than 2/1.
        assert_eq!(lc.pick(&[4, 1], &[4, 2]), Some(0));
        // Zero weight: never, however idle.
        assert_eq!(lc.pick(&[0, 1], &[0, 9]), Some(1));
        assert_eq!(lc.pick(&[0, 0], &[0, 0]), None);
    }

    #[test]
    fn equal_servers_take_turns() {
        let lc = LeastConn::default();
        let picks: Vec<usize> = (0..6).map(|_| lc.pick(&[1, 1, 1], &[0, 0, 0]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
