//! Logging that never stalls the data path.
//!
//! [`RateLimit`] keeps a warning that can repeat once per connection (a
//! failed pipe, a refused socket) to one line per period, and says how
//! many were held back.

use std::time::{Duration, Instant};

/// One line per `period`; the lines held back in between are counted and
/// reported with the next line written.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(period: Duration) -> RateLimit {
        RateLimit {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were
    /// held back since the last one; `None` when this one is held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < self.period)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// The suffix for a line written after `held_back` were suppressed.
    pub fn suffix(&self, held_back: u64) -> String {
        if held_back == 0 {
            String::new()
        } else {
            format!(" ({held_back} more in the last {:?})", self.period)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_the_count_held_back() {
        let mut limit = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(limit.allow(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(limit.allow(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(limit.suffix(5), " (5 more in the last 10s)");
        assert_eq!(limit.suffix(0), "");
    }
}
