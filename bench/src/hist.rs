//! A latency histogram in bounded memory: log-linear buckets (64 per power of two, so a value
//! is known within 1/64 ≈ 1.6 %), exact below 64 ns, with the exact maximum. 3,776 counters
//! cover every `u64`, whatever the number of requests.

/// Linear sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) << SUB_BITS;

/// Counts of values (nanoseconds) by bucket.
#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    n: u64,
    max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS],
            n: 0,
            max: 0,
        }
    }
}

/// The bucket of `v`.
fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) & (SUB - 1);
    ((((shift + 1) as u64) << SUB_BITS) | sub) as usize
}

/// The largest value of bucket `i`.
fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let shift = (i >> SUB_BITS) - 1;
    let low = (SUB + (i & (SUB - 1))) << shift;
    low + ((1u64 << shift) - 1)
}

impl Hist {
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.n += 1;
        self.max = self.max.max(v);
    }

    /// Adds `o`'s values to these.
    pub fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
        self.max = self.max.max(o.max);
    }

    /// How many values were recorded.
    pub fn n(&self) -> u64 {
        self.n
    }

    /// The largest value recorded, 0 if none.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value of rank ⌈q·n⌉ (q in 0..=1), as its bucket's upper bound (never above the
    /// maximum); 0 if empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut last = None;
        for v in (0..5000).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let i = index(v);
            assert!(upper(i) >= v, "{v} above its bucket {i} ({})", upper(i));
            if i > 0 {
                assert!(upper(i - 1) < v, "{v} fits bucket {} already", i - 1);
            }
            // Within 1/64 of the value.
            assert!(upper(i) - v <= v / SUB, "{v}: bucket up to {}", upper(i));
            if let Some(l) = last {
                assert!(i >= l);
            }
            last = Some(i);
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles() {
        let mut h = Hist::default();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=100u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.n(), 100);
        assert_eq!(h.max(), 100_000);
        let within = |got: u64, want: u64| got >= want && got - want <= want / SUB;
        assert!(within(h.quantile(0.5), 50_000), "{}", h.quantile(0.5));
        assert!(within(h.quantile(0.99), 99_000), "{}", h.quantile(0.99));
        assert_eq!(h.quantile(1.0), 100_000);
        assert!(within(h.quantile(0.0), 1000));
        let mut m = Hist::default();
        m.record(7);
        m.merge(&h);
        assert_eq!((m.n(), m.max(), m.quantile(0.0)), (101, 100_000, 7));
    }
}
