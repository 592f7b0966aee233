//! Statistics over measured passes: median, range, and the per-pass ratio.

use serde::Serialize;

/// Median of `values` (mean of the two middle values for an even count); `None` when empty
/// or when a value is not a number.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// `a / b` pass by pass (the ratio taken inside one pass). `None` where `b` is zero or the
/// lengths differ.
pub fn ratios(a: &[f64], b: &[f64]) -> Option<Vec<f64>> {
    if a.len() != b.len() || b.contains(&0.0) {
        return None;
    }
    Some(a.iter().zip(b).map(|(x, y)| x / y).collect())
}

/// Element-wise minimum of two series of equal length.
pub fn pairwise_min(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x.min(*y)).collect()
}

/// The `q`-quantile (0..=1) of `values` by nearest rank; `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// Median, minimum and maximum of the measured passes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// The median pass.
    pub median: f64,
    /// The lowest pass.
    pub min: f64,
    /// The highest pass.
    pub max: f64,
}

impl Summary {
    /// The summary of `values`; `None` when empty or not numbers.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let median = median(values)?;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Summary { median, min, max })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn ratio_is_taken_inside_each_pass() {
        // The lib is slower than the baseline by a different factor in each pass.
        let lib = [90.0, 50.0, 80.0];
        let raw = [100.0, 100.0, 80.0];
        assert_eq!(ratios(&lib, &raw), Some(vec![0.9, 0.5, 1.0]));
        // Not the ratio of medians (80 / 100 = 0.8): the per-pass median is 0.9.
        assert_eq!(median(&ratios(&lib, &raw).expect("ratios")), Some(0.9));
        assert_eq!(ratios(&[1.0], &[0.0]), None);
        assert_eq!(ratios(&[1.0, 2.0], &[1.0]), None);
    }

    #[test]
    fn pairwise_min_picks_the_slower_baseline_per_pass() {
        assert_eq!(pairwise_min(&[1.0, 5.0], &[2.0, 3.0]), vec![1.0, 3.0]);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn summary_has_median_min_max() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).expect("summary");
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert!(Summary::of(&[]).is_none());
    }
}
