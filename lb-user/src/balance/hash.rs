//! `balance: source` and `balance: uri`: a key (the client's address, or the request's path)
//! always maps to the same server while the servers stay the same, and when one goes (weight
//! 0, or later down) only the keys it had move. Weighted rendezvous hashing: each server scores
//! the key with its own seeded hash, `weight / -ln(hash in (0, 1])`, and the highest score
//! wins, so a server gets `weight / sum(weights)` of the keys. (A HAProxy user may know the
//! `hash-type consistent` ring; rendezvous gives the same guarantee without one.)
//!
//! The hash is XXH3, a specified algorithm: the same key goes to the same server after lb is
//! restarted or upgraded.
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

pub struct Rendezvous {
    /// Per server, its hash seed: from its name, so reordering servers in the file moves
    /// nobody.
    seeds: Vec<u64>,
}

impl Rendezvous {
    pub fn new<'a>(names: impl Iterator<Item = &'a str>) -> Rendezvous {
        Rendezvous {
            seeds: names.map(|n| xxh3_64(n.as_bytes())).collect(),
        }
    }

    /// The server for `key` given the weights now; `None` when every weight is 0.
    pub fn pick(&self, weights: &[u32], key: &[u8]) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, (&w, &seed)) in weights.iter().zip(&self.seeds).enumerate() {
            if w == 0 {
                continue;
            }
            let h = xxh3_64_with_seed(key, seed);
            // 53 bits into (0, 1]: never 0, whose logarithm has no finite score.
            let unit = ((h >> 11) + 1) as f64 / (1u64 << 53) as f64;
            // -ln(1) is 0: the best score there is (not -inf, what w / -0.0 would give).
            let distance = -unit.ln();
            let score = if distance > 0.0 {
                f64::from(w) / distance
            } else {
                f64::INFINITY
            };
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize) -> Rendezvous {
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        Rendezvous::new(names.iter().map(String::as_str))
    }

    /// 1,000 simulated clients, 10.0.x.y.
    fn clients() -> Vec<[u8; 4]> {
        (0..1000u32)
            .map(|i| [10, 0, (i / 256) as u8, (i % 256) as u8])
            .collect()
    }

    #[test]
    fn a_client_stays_on_its_server_and_clients_spread_evenly() {
        let r = ring(4);
        let weights = [1; 4];
        let mut count = [0; 4];
        for c in clients() {
            let s = r.pick(&weights, &c).unwrap();
            assert_eq!(r.pick(&weights, &c), Some(s));
            count[s] += 1;
        }
        // 250 each expected; a binomial's spread is about 14.
        for n in count {
            assert!((190..=310).contains(&n), "{count:?}");
        }
    }

    #[test]
    fn removing_one_of_n_servers_moves_only_its_clients() {
        for n in [2, 3, 4, 5, 8] {
            let r = ring(n);
            let all = vec![1; n];
            for gone in 0..n {
                let mut fewer = all.clone();
                fewer[gone] = 0;
                let mut moved = 0;
                for c in clients() {
                    let before = r.pick(&all, &c).unwrap();
                    let after = r.pick(&fewer, &c).unwrap();
                    if before != after {
                        // Only the removed server's clients move.
                        assert_eq!(before, gone);
                        moved += 1;
                    }
                }
                let limit = 1000.0 * (1.0 / n as f64 + 0.05);
                assert!(f64::from(moved) <= limit, "n={n}: {moved} moved, limit {limit}");
            }
        }
    }

    #[test]
    fn weights_set_the_shares() {
        let r = ring(2);
        let mut count = [0; 2];
        for i in 0..4000u32 {
            count[r.pick(&[3, 1], &i.to_be_bytes()).unwrap()] += 1;
        }
        // 3000 / 1000 expected; spread about 27.
        assert!((2850..=3150).contains(&count[0]), "{count:?}");
    }

    #[test]
    fn reordering_servers_moves_nobody() {
        let ab = Rendezvous::new(["a", "b", "c"].into_iter());
        let ba = Rendezvous::new(["c", "b", "a"].into_iter());
        for c in clients() {
            let x = ab.pick(&[1, 1, 1], &c).unwrap();
            let y = ba.pick(&[1, 1, 1], &c).unwrap();
            assert_eq!(x, 2 - y);
        }
    }
}
