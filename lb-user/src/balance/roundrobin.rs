//! `balance: roundrobin`: smooth weighted round robin (the nginx algorithm). Over any window of
//! `sum(weights)` picks each server is chosen exactly `weight` times, interleaved rather than in
//! bursts. A server whose weight is 0 (or becomes 0) is skipped and gathers no credit.
use std::sync::Mutex;

pub struct RoundRobin {
    /// Each server's running credit.
    current: Mutex<Vec<i64>>,
}

impl RoundRobin {
    pub fn new(servers: usize) -> RoundRobin {
        RoundRobin {
            current: Mutex::new(vec![0; servers]),
        }
    }

    /// The index of the next server given the weights now, or `None` when every weight is 0.
    pub fn pick(&self, weights: &[u32]) -> Option<usize> {
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        if total == 0 {
            return None;
        }
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut best = None;
        for (i, &w) in weights.iter().enumerate() {
            if w == 0 {
                // Out of the rotation: it comes back without a backlog of credit.
                current[i] = 0;
                continue;
            }
            current[i] += i64::from(w);
            if best.is_none_or(|b: usize| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_honoured_and_interleaved() {
        let rr = RoundRobin::new(3);
        let picks: Vec<usize> = (0..8).map(|_| rr.pick(&[3, 1, 0]).unwrap()).collect();
        assert_eq!(picks, [0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn all_zero_weights_pick_nothing() {
        assert_eq!(RoundRobin::new(2).pick(&[0, 0]), None);
    }

    #[test]
    fn a_changed_weight_applies_at_the_next_pick() {
        let rr = RoundRobin::new(2);
        let mut count = [0; 2];
        for _ in 0..100 {
            count[rr.pick(&[1, 1]).unwrap()] += 1;
        }
        assert_eq!(count, [50, 50]);
        let mut count = [0; 2];
        for _ in 0..400 {
            count[rr.pick(&[3, 1]).unwrap()] += 1;
        }
        assert_eq!(count, [300, 100]);
    }
}
