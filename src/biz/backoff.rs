//! Exponential backoff with a cap, shared by every retry loop (database start-up, event
//! consumer, outbox relay).

use std::time::Duration;

/// Delays that double from `first` up to `max`, until `reset`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `first`, never exceeds `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { first, next: first, max }
    }

    /// The delay to wait now; the next one is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// The delay the next `next_delay` returns, without advancing.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// The delay after `attempt` consecutive failures (1 = `first`), for callers that
    /// keep a count per item rather than one `Backoff` each.
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }

    /// Back to `first`, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));

        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        b.reset();

        assert_eq!(delays, [100, 200, 400, 500, 500]);
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        let by_count: Vec<u128> = (1..=5).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(by_count, delays);
    }
}
