//! Per-object exponential backoff of failed reconciles, reset on success.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The first retry after a failure.
const FIRST: Duration = Duration::from_secs(1);
/// The longest wait between retries.
const LONGEST: Duration = Duration::from_secs(300);

/// Failures in a row, per object key.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records a failure of `key` and returns how long to wait before the
    /// next try: 1 s, 2 s, 4 s, ... up to 5 minutes.
    pub fn failed(&self, key: &str) -> Duration {
        let n = match self.failures.lock() {
            Ok(mut failures) => {
                let n = failures.entry(key.to_owned()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        delay(n)
    }

    /// Forgets the failures of `key` (it reconciled).
    pub fn succeeded(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock()
            && !failures.is_empty()
        {
            failures.remove(key);
        }
    }
}

/// The wait after `n` failures in a row.
fn delay(n: u32) -> Duration {
    let doublings = n.saturating_sub(1).min(16);
    FIRST.saturating_mul(1 << doublings).min(LONGEST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_five_minutes_and_reset_on_success() {
        let backoff = Backoff::default();
        let waits: Vec<u64> = (0..12)
            .map(|_| backoff.failed("shop/api").as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        // Another object has its own count.
        assert_eq!(backoff.failed("shop/web"), Duration::from_secs(1));
        backoff.succeeded("shop/api");
        assert_eq!(backoff.failed("shop/api"), Duration::from_secs(1));
    }

    #[test]
    fn a_long_run_of_failures_never_overflows() {
        assert_eq!(delay(u32::MAX), LONGEST);
        assert_eq!(delay(0), FIRST);
    }
}
