//! Server selection: smooth weighted round robin (the nginx algorithm): over any window of
//! `sum(weights)` picks each server is chosen exactly `weight` times, interleaved rather than in
//! bursts.
use std::sync::Mutex;

pub struct RoundRobin {
    weights: Vec<i64>,
    current: Mutex<Vec<i64>>,
}

impl RoundRobin {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> RoundRobin {
        let weights: Vec<i64> = weights.into_iter().map(i64::from).collect();
        let current = Mutex::new(vec![0; weights.len()]);
        RoundRobin { weights, current }
    }

    /// The index of the next server, or `None` when every weight is 0.
    pub fn pick(&self) -> Option<usize> {
        let total: i64 = self.weights.iter().sum();
        if total == 0 {
            return None;
        }
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut best = 0;
        for (i, w) in self.weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_honoured_and_interleaved() {
        let rr = RoundRobin::new([3, 1, 0]);
        let picks: Vec<usize> = (0..8).map(|_| rr.pick().unwrap()).collect();
        assert_eq!(picks, [0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn all_zero_weights_pick_nothing() {
        assert_eq!(RoundRobin::new([0, 0]).pick(), None);
    }
}
