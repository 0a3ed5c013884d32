//! The order of the targets in each round (direct, abproxy, the reference
//! column): every permutation in turn, so that drift on a shared machine
//! favours none of them.

/// The order of the targets in round `round`: every permutation in turn
/// (six for three targets), so over 6k rounds each target runs in each
/// position, and right after each other target, equally often. A rotation
/// (`direct, abproxy, haproxy`, then shifted) put abproxy right before
/// HAProxy in two rounds of three.
pub fn round_order<T: Clone>(targets: &[T], round: usize) -> Vec<T> {
    let n = targets.len();
    let count: usize = (1..=n).product();
    // The `round % n!`-th permutation in lexicographic order of positions
    // (factorial number system).
    let mut k = round % count;
    let mut left: Vec<T> = targets.to_vec();
    let mut out = Vec::with_capacity(n);
    for i in (1..=n).rev() {
        let block: usize = (1..i).product();
        out.push(left.remove(k / block));
        k %= block;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orders are balanced. Over six rounds of three targets, six
    /// different orders, each target twice in each position and each
    /// ordered pair twice next to each other; round 6 starts again; two
    /// targets alternate.
    #[test]
    fn three_targets_balanced() {
        let t = [0usize, 1, 2];
        let orders: Vec<Vec<usize>> = (0..6).map(|r| round_order(&t, r)).collect();
        let mut distinct = orders.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 6, "six different orders: {orders:?}");
        for target in t {
            for pos in 0..3 {
                let n = orders.iter().filter(|o| o[pos] == target).count();
                assert_eq!(n, 2, "target {target} at position {pos}: {orders:?}");
            }
            for next in t.iter().filter(|&&x| x != target) {
                let n = orders
                    .iter()
                    .filter(|o| o.windows(2).any(|w| w == [target, *next]))
                    .count();
                assert_eq!(n, 2, "{target} right before {next}: {orders:?}");
            }
        }
        assert_eq!(round_order(&t, 6), orders[0]);
        assert_eq!(round_order(&[7, 8], 0), [7, 8]);
        assert_eq!(round_order(&[7, 8], 1), [8, 7]);
    }

    /// Every round keeps every target exactly once, whatever the count.
    #[test]
    fn every_round_is_a_permutation() {
        for n in 1..=4 {
            let t: Vec<usize> = (0..n).collect();
            let rounds: usize = (1..=n).product();
            let mut seen = Vec::new();
            for r in 0..rounds {
                let mut o = round_order(&t, r);
                seen.push(o.clone());
                o.sort_unstable();
                assert_eq!(o, t, "round {r} of {n} targets");
            }
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), rounds, "{n} targets: every permutation once");
        }
        assert_eq!(round_order(&[(); 0], 3), Vec::<()>::new());
    }

    /// Round 0 is the given order: a one-round run measures direct first.
    #[test]
    fn first_round_keeps_the_order() {
        assert_eq!(
            round_order(&["direct", "abproxy", "haproxy"], 0),
            ["direct", "abproxy", "haproxy"]
        );
        assert_eq!(
            round_order(&["direct", "abproxy", "haproxy"], 1),
            ["direct", "haproxy", "abproxy"]
        );
    }
}
