//! `balance: random`: the power of two choices (HAProxy's `random(2)`). Two servers drawn at
//! random by weight, and the new flow goes to the one with fewer current sessions per unit of
//! weight: as even as random on equal servers, and a loaded server is seldom picked.
use super::lighter;

/// `weights` and `active`: each server's weight and current sessions, same order; `None`
/// when every weight is 0.
pub fn pick(weights: &[u32], active: &[u32], rng: &mut fastrand::Rng) -> Option<usize> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let first = draw(weights, total, None, rng)?;
    // The second draw is among the others: two distinct candidates whenever there are two.
    let Some(second) = draw(weights, total - u64::from(weights[first]), Some(first), rng) else {
        return Some(first);
    };
    Some(
        if lighter(active[second], weights[second], active[first], weights[first]) {
            second
        } else {
            first
        },
    )
}

/// A server drawn with probability proportional to its weight, `skip` left out (`total`: the
/// weights without it).
fn draw(weights: &[u32], total: u64, skip: Option<usize>, rng: &mut fastrand::Rng) -> Option<usize> {
    if total == 0 {
        return None;
    }
    let mut at = rng.u64(0..total);
    for (i, &w) in weights.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        if at < u64::from(w) {
            return Some(i);
        }
        at -= u64::from(w);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_idle_servers_share_evenly() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut count = [0u32; 4];
        for _ in 0..4000 {
            count[pick(&[1; 4], &[0; 4], &mut rng).unwrap()] += 1;
        }
        // 1000 each expected.
        for n in count {
            assert!((900..=1100).contains(&n), "{count:?}");
        }
    }

    #[test]
    fn a_loaded_server_is_avoided() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut count = [0u32; 4];
        for _ in 0..4000 {
            count[pick(&[1; 4], &[50, 0, 0, 0], &mut rng).unwrap()] += 1;
        }
        // Whenever server 0 is drawn, the other candidate is lighter.
        assert_eq!(count[0], 0, "{count:?}");
        for n in &count[1..] {
            assert!((1150..=1520).contains(n), "{count:?}");
        }
    }

    #[test]
    fn one_server_and_no_server() {
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(pick(&[0, 5, 0], &[9, 9, 9], &mut rng), Some(1));
        assert_eq!(pick(&[0, 0], &[0, 0], &mut rng), None);
    }
}
