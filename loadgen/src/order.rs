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

/// The order of the targets in round `round` for sections with four or
/// more targets and few rounds (the journal section): a balanced Latin
/// square (Williams design). With an even count n, over n rounds each
/// target runs once in each position and right before each other target
/// once; [`round_order`] needs n! rounds for that, and over its first
/// rounds keeps the first target first.
pub fn latin_order<T: Clone>(targets: &[T], round: usize) -> Vec<T> {
    let n = targets.len();
    if n == 0 {
        return Vec::new();
    }
    // First row 0, 1, n-1, 2, n-2, ...; row r adds r (mod n).
    let mut first = Vec::with_capacity(n);
    let (mut lo, mut hi) = (1, n - 1);
    first.push(0);
    while first.len() < n {
        first.push(lo);
        lo += 1;
        if first.len() < n {
            first.push(hi);
            hi -= 1;
        }
    }
    first
        .into_iter()
        .map(|i| targets[(i + round) % n].clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four targets over four rounds: each in each position once, each
    /// ordered pair next to each other once; round 4 starts again.
    #[test]
    fn latin_four_targets_balanced() {
        let t = [0usize, 1, 2, 3];
        let orders: Vec<Vec<usize>> = (0..4).map(|r| latin_order(&t, r)).collect();
        assert_eq!(orders[0], [0, 1, 3, 2]);
        for target in t {
            for pos in 0..4 {
                let n = orders.iter().filter(|o| o[pos] == target).count();
                assert_eq!(n, 1, "target {target} at position {pos}: {orders:?}");
            }
            for next in t.iter().filter(|&&x| x != target) {
                let n = orders
                    .iter()
                    .filter(|o| o.windows(2).any(|w| w == [target, *next]))
                    .count();
                assert_eq!(n, 1, "{target} right before {next}: {orders:?}");
            }
        }
        assert_eq!(latin_order(&t, 4), orders[0]);
        for n in 0..=5 {
            let t: Vec<usize> = (0..n).collect();
            for r in 0..n {
                let mut o = latin_order(&t, r);
                o.sort_unstable();
                assert_eq!(o, t, "round {r} of {n} targets");
            }
        }
    }

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
