//! One token bucket for the agent and the sidecar: `capacity` tokens, refilled continuously at
//! `per_sec`, starting full. Time is whatever [`Moment`] the caller has (an `Instant`, or a
//! `Duration` since a clock's origin); a moment earlier than the last one refills nothing.

use core::time::Duration;

/// A point in time the bucket can measure from.
pub trait Moment: Copy + Ord {
    /// Time from `earlier` to `self`; zero when `earlier` is later.
    fn since(self, earlier: Self) -> Duration;
}

impl Moment for Duration {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_sub(earlier)
    }
}

#[cfg(any(test, feature = "client", feature = "otlp"))]
impl Moment for std::time::Instant {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

#[derive(Debug, Clone)]
pub struct TokenBucket<T> {
    capacity: f64,
    per_sec: f64,
    /// May go below zero: [`TokenBucket::reserve`] takes what it was asked for.
    balance: f64,
    /// The latest moment seen; `None` until the first.
    last: Option<T>,
}

impl<T: Moment> TokenBucket<T> {
    /// A full bucket of `capacity` tokens that refills `per_sec` tokens a second.
    pub fn full(capacity: f64, per_sec: f64) -> Self {
        Self {
            capacity,
            per_sec,
            balance: capacity,
            last: None,
        }
    }

    /// New numbers; the balance is kept, cut to the new capacity.
    pub fn set_rate(&mut self, capacity: f64, per_sec: f64) {
        self.capacity = capacity;
        self.per_sec = per_sec;
        self.balance = self.balance.min(capacity);
    }

    /// Add what accrued since the last moment seen (never beyond the capacity).
    pub fn refill(&mut self, now: T) {
        if let Some(last) = self.last {
            let dt = now.since(last).as_secs_f64();
            self.balance = (self.balance + dt * self.per_sec).min(self.capacity);
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
    }

    /// Take `n` tokens if the balance (refilled to `now`) holds them.
    pub fn take(&mut self, n: f64, now: T) -> bool {
        self.refill(now);
        if self.balance >= n {
            self.balance -= n;
            true
        } else {
            false
        }
    }

    /// Take `n` tokens when the balance covers them, or, when `n` is more than the whole
    /// capacity, when the bucket is full; the balance may then go below zero. Otherwise the
    /// wait until it would.
    pub fn reserve(&mut self, n: f64, now: T) -> Result<(), Duration> {
        self.refill(now);
        let need = n.min(self.capacity);
        if self.balance >= need {
            self.balance -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (need - self.balance) / self.per_sec,
            ))
        }
    }

    /// Give back `n` tokens (or take them, when negative); never beyond the capacity.
    pub fn credit(&mut self, n: f64, now: T) {
        self.refill(now);
        self.balance = (self.balance + n).min(self.capacity);
    }

    /// The balance as of the last moment seen (below zero after an overdraft).
    pub fn balance(&self) -> f64 {
        self.balance
    }

    /// How long until the bucket is full again, from the last moment seen.
    pub fn until_full(&self) -> Duration {
        Duration::from_secs_f64(((self.capacity - self.balance) / self.per_sec).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_full_bucket_gives_its_capacity_then_refills_at_its_rate() {
        let mut b = TokenBucket::full(3.0, 1.0);
        let t0 = s(100.0);
        assert_eq!((0..10).filter(|_| b.take(1.0, t0)).count(), 3);
        assert!(!b.take(1.0, s(100.5)));
        assert!(b.take(1.0, s(101.0)));
        // A long pause refills to the capacity, no more.
        assert_eq!((0..10).filter(|_| b.take(1.0, s(1000.0))).count(), 3);
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let mut b = TokenBucket::full(1.0, 1.0);
        assert!(b.take(1.0, s(10.0)));
        assert!(!b.take(1.0, s(5.0)));
        // Measured from the latest moment, not the earlier one.
        assert!(!b.take(1.0, s(10.5)));
        assert!(b.take(1.0, s(11.0)));
    }

    #[test]
    fn a_new_rate_cuts_the_balance_to_the_new_capacity() {
        let mut b = TokenBucket::full(10.0, 1.0);
        b.set_rate(2.0, 2.0);
        assert_eq!(b.balance(), 2.0);
        assert_eq!((0..5).filter(|_| b.take(1.0, s(0.0))).count(), 2);
        assert!(b.take(1.0, s(0.5)));
        // A zero rate gives nothing.
        b.set_rate(0.0, 0.0);
        assert!(!b.take(1.0, s(100.0)));
    }

    #[test]
    fn a_reservation_may_overdraw_and_says_how_long_to_wait() {
        let mut b = TokenBucket::full(60.0, 1.0);
        assert_eq!(b.reserve(50.0, s(0.0)), Ok(()));
        assert_eq!(b.reserve(20.0, s(0.0)), Err(s(10.0)));
        // More than the capacity: admitted once the bucket is full, leaving it overdrawn.
        assert_eq!(b.reserve(100.0, s(0.0)), Err(s(50.0)));
        assert_eq!(b.reserve(100.0, s(50.0)), Ok(()));
        assert_eq!(b.balance(), -40.0);
        assert_eq!(b.until_full(), s(100.0));
        // Credit gives back, up to the capacity.
        b.credit(1000.0, s(50.0));
        assert_eq!(b.balance(), 60.0);
        assert_eq!(b.until_full(), Duration::ZERO);
    }

    #[test]
    fn instants_work_as_moments() {
        let t0 = std::time::Instant::now();
        let mut b = TokenBucket::full(1.0, 1.0);
        assert!(b.take(1.0, t0));
        assert!(!b.take(1.0, t0));
        assert!(b.take(1.0, t0 + Duration::from_secs(1)));
    }
}
