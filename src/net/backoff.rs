//! Delays between reconnect attempts: doubling from a minimum up to a maximum, each drawn
//! at random from its upper half, so that many nodes that lost the same peer do not all
//! call it again at the same instant.

use std::time::Duration;

pub(crate) const MIN_DELAY: Duration = Duration::from_millis(100);
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// After a connection that worked: start again from the minimum.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay before the next attempt, in `[ceiling / 2, ceiling]`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        let floor_ms = ceiling_ms / 2;
        Duration::from_millis(fastrand::u64(floor_ms..=ceiling_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_within_jitter() {
        let mut backoff = Backoff::new(MIN_DELAY, Duration::from_secs(1));
        let ceilings: [u128; 6] = [100, 200, 400, 800, 1000, 1000];
        for ceiling in ceilings {
            let delay = backoff.next_delay().as_millis();
            assert!(
                (ceiling / 2..=ceiling).contains(&delay),
                "{delay} ms outside [{}, {ceiling}]",
                ceiling / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= MIN_DELAY);
    }
}
