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

/// The upper medians of a lab benchmark's `@@WHAT-SIZE-ROUND=SECONDS
/// [KIB]` values over rounds 1..=`rounds`: (seconds, KiB; 0 when absent).
pub fn rounds(values: &std::collections::BTreeMap<String, String>, what: &str, size: u32, rounds: u32) -> anyhow::Result<(f64, f64)> {
    let (mut t, mut kib) = (Vec::new(), Vec::new());
    for r in 1..=rounds {
        let key = format!("{what}-{size}-{r}");
        let raw = values.get(&key).ok_or_else(|| anyhow::anyhow!("no {key} in the lab's output"))?;
        let mut f = raw.split_whitespace();
        t.push(f.next().unwrap_or("").parse::<f64>()?);
        kib.push(f.next().map_or(Ok(0.0), str::parse::<f64>)?);
    }
    Ok((upper_median(t), upper_median(kib)))
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
        let v = [("SAVE-512-1", "2.5 100"), ("SAVE-512-2", "1.5 300"), ("LOAD-512-1", "0.5")].map(|(k, x)| (k.to_string(), x.to_string())).into_iter().collect();
        assert_eq!(rounds(&v, "SAVE", 512, 2).unwrap(), (2.5, 300.0));
        assert_eq!(rounds(&v, "LOAD", 512, 1).unwrap(), (0.5, 0.0));
        assert!(rounds(&v, "LOAD", 512, 2).unwrap_err().to_string().contains("no LOAD-512-2"));
    }
}
