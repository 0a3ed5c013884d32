//! The statistics the tables print: medians over rounds, percentiles of
//! latency samples, a distribution-free confidence interval for a median,
//! and the formatting of optional values.

pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// A distribution-free confidence interval for the median of `sorted`
/// (ascending): the order statistics x(k) .. x(n+1-k) for the largest k whose
/// coverage, 1 - 2 P(Binomial(n, 1/2) < k), is still at least `conf`.
/// Returns the bounds and their exact coverage; None when even the whole
/// range (k = 1) covers less than `conf` (too few rounds).
pub fn median_interval(sorted: &[f64], conf: f64) -> Option<(f64, f64, f64)> {
    let n = sorted.len();
    // P(Binomial(n, 1/2) <= j) for j = 0..n.
    let mut cdf = Vec::with_capacity(n + 1);
    let (mut pmf, mut acc) = (0.5f64.powi(n as i32), 0.0);
    for j in 0..=n {
        acc += pmf;
        cdf.push(acc);
        pmf *= (n - j) as f64 / (j + 1) as f64;
    }
    let coverage = |k: usize| 1.0 - 2.0 * cdf[k - 1];
    let k = (1..=n / 2).take_while(|&k| coverage(k) >= conf).last()?;
    Some((sorted[k - 1], sorted[n - k], coverage(k)))
}

/// Percentile `p` (0..=100) of sorted nanoseconds, in µs.
pub fn pct_us(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0)
}

pub fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

/// One value per probe (proxy, slapd, load generator), each right-aligned
/// in 4 columns, for a point's log line.
pub fn per_probe(v: &[Option<f64>], prec: usize) -> String {
    (0..3)
        .map(|i| format!("{:>4}", fmt_opt(v.get(i).copied().flatten(), prec)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0]), Some(3.0));
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        // Sorts in place.
        let mut v = [2.0, f64::INFINITY, -1.0];
        assert_eq!(median(&mut v), Some(2.0));
        assert_eq!(v, [-1.0, 2.0, f64::INFINITY]);
    }

    /// Nearest rank: the smallest sample with at least p % at or below it.
    #[test]
    fn percentiles_nearest_rank_in_us() {
        assert_eq!(pct_us(&[], 50.0), None);
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(pct_us(&v, 50.0), Some(50.0));
        assert_eq!(pct_us(&v, 99.0), Some(99.0));
        assert_eq!(pct_us(&v, 100.0), Some(100.0));
        assert_eq!(pct_us(&v, 0.0), Some(1.0));
        let v = [1500, 2500, 10_000];
        assert_eq!(pct_us(&v, 50.0), Some(2.5));
        assert_eq!(pct_us(&v, 99.0), Some(10.0));
        assert_eq!(pct_us(&[7000], 99.0), Some(7.0));
    }

    /// Coverage 1 - 2 P(Bin(n, 1/2) < k): 4 rounds cannot reach 90 %
    /// (the full range covers 87.5 %), 5 can (93.75 %); 10 rounds give
    /// x(2) .. x(9) at 97.85 % (x(3) .. x(8) would be 89.06 %).
    #[test]
    fn median_interval_coverage() {
        let s = |n: usize| (1..=n).map(|i| i as f64).collect::<Vec<_>>();
        assert_eq!(median_interval(&s(4), 0.9), None);
        let (lo, hi, c) = median_interval(&s(5), 0.9).unwrap();
        assert_eq!((lo, hi), (1.0, 5.0));
        assert!((c - 0.9375).abs() < 1e-12, "{c}");
        let (lo, hi, c) = median_interval(&s(10), 0.9).unwrap();
        assert_eq!((lo, hi), (2.0, 9.0));
        assert!((c - (1.0 - 2.0 * 11.0 / 1024.0)).abs() < 1e-12, "{c}");
        assert_eq!(median_interval(&[], 0.9), None);
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_opt(None, 2), "-");
        assert_eq!(fmt_opt(Some(1.23456), 2), "1.23");
        assert_eq!(fmt_opt(Some(99.5), 0), "100");
        assert_eq!(per_probe(&[Some(1.0), None], 1), " 1.0    -    -");
        assert_eq!(
            per_probe(&[Some(1.0), Some(22.25), Some(3.0), Some(4.0)], 2),
            "1.00 22.25 3.00"
        );
    }
}
