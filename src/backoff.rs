//! Pauses between attempts at reaching something outside the process (a
//! server coming back after a restart): doubling from a first pause up to a
//! longest one, all within a bound from the first attempt.

use std::time::Duration;

use tokio::time::Instant;

/// Doubling pauses within a bound.
#[derive(Debug)]
pub(crate) struct Backoff {
    started: Instant,
    pause: Duration,
    longest: Duration,
    bound: Duration,
}

impl Backoff {
    /// Starts counting now: pauses of `first`, doubling up to `longest`,
    /// while the time since now plus the next pause stays within `bound`.
    pub(crate) fn new(first: Duration, longest: Duration, bound: Duration) -> Backoff {
        Backoff {
            started: Instant::now(),
            pause: first,
            longest,
            bound,
        }
    }

    /// The pause before the next attempt, or `None` when it would end past
    /// the bound (then give up).
    pub(crate) fn next_pause(&mut self) -> Option<Duration> {
        if self.started.elapsed() + self.pause > self.bound {
            return None;
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(self.longest);
        Some(pause)
    }

    /// Time since the first attempt.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pauses_double_up_to_the_longest_within_the_bound() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(50), ms(300), ms(1000));
        let mut pauses = Vec::new();
        while let Some(p) = b.next_pause() {
            pauses.push(p.as_millis());
            tokio::time::sleep(p).await;
        }
        // 50+100+200+300 = 650; another 300 still ends within 1000 (950);
        // the next would end at 1250.
        assert_eq!(pauses, [50, 100, 200, 300, 300]);
        assert_eq!(b.elapsed(), ms(950));
    }
}
