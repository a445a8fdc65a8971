//! The medians the benchmarks print, in one place.

/// The median of the figures that exist (NaN when none do); with an even
/// count, the mean of the two middle ones.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.retain(|x| x.is_finite());
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

/// The figure at the middle once sorted (the upper of the two middle ones
/// with an even count), as the host benchmarks have always printed; NaN
/// when there is none.
pub fn upper_median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, f64::NAN, 2.0, 3.0]), 2.5, "NaN left out, even count averaged");
        assert!(median(vec![f64::NAN]).is_nan());
        assert_eq!(upper_median(vec![4.0, 1.0, 2.0, 3.0]), 3.0);
        assert_eq!(upper_median(vec![5.0, 1.0, 3.0]), 3.0);
        assert!(upper_median(Vec::new()).is_nan());
    }
}
