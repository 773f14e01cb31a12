//! How long a stage waits before trying again: the one exponential backoff every retrying part of
//! the agent uses (the exporter helper, pipeline delivery, Kubernetes watch restarts).
//!
//! Waits grow from `initial` by `multiplier` up to `max`, each randomized by ± `randomization_factor`
//! so that many retrying senders spread out. A server's hint (gRPC `RetryInfo`, HTTP
//! `Retry-After`) can lengthen a wait but never shorten it: a hint of zero or a date in the past
//! must not turn retries into a busy loop. This module only computes waits; it never sleeps.

use std::time::Duration;

use rand::Rng as _;
use tokio::time::Instant;

/// The shape of a backoff.
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffPolicy {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
    /// Growth of the wait per attempt (at least 1).
    pub multiplier: f64,
    /// Each wait is drawn from `wait × [1 − f, 1 + f]`; 0 waits exactly.
    pub randomization_factor: f64,
    /// Give up once the next attempt would start this long after the first (`None`: never).
    pub max_elapsed: Option<Duration>,
}

/// The waits of one series of attempts (one batch, one watch outage).
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
    started: Instant,
}

impl Backoff {
    /// A series that starts now.
    pub fn new(policy: BackoffPolicy) -> Backoff {
        Backoff {
            next: policy.initial,
            started: Instant::now(),
            policy,
        }
    }

    /// The wait before the next attempt, at least `hint` when the other side gave one; `None`
    /// when that attempt would start after `max_elapsed` (time to give up).
    pub fn next_wait(&mut self, hint: Option<Duration>) -> Option<Duration> {
        let own = randomized(self.next, self.policy.randomization_factor);
        self.next = self
            .next
            .mul_f64(self.policy.multiplier.max(1.0))
            .min(self.policy.max);
        let wait = hint.map_or(own, |hint| hint.max(own));
        match self.policy.max_elapsed {
            Some(limit) if self.started.elapsed() + wait > limit => None,
            _ => Some(wait),
        }
    }

    /// Starts a new series (the stage succeeded): the next wait is `initial` again.
    pub fn reset(&mut self) {
        self.next = self.policy.initial;
        self.started = Instant::now();
    }
}

fn randomized(wait: Duration, factor: f64) -> Duration {
    if factor <= 0.0 {
        return wait;
    }
    wait.mul_f64(rand::rng().random_range((1.0 - factor)..=(1.0 + factor)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
            multiplier: 2.0,
            randomization_factor: 0.0,
            max_elapsed: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_grow_to_the_maximum_and_start_over_after_a_reset() {
        let mut backoff = Backoff::new(policy());
        let waits: Vec<_> = (0..5).map(|_| backoff.next_wait(None).unwrap()).collect();
        let ms = Duration::from_millis;
        assert_eq!(waits, vec![ms(100), ms(200), ms(400), ms(400), ms(400)]);
        backoff.reset();
        assert_eq!(backoff.next_wait(None), Some(ms(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hint_lengthens_a_wait_but_never_shortens_it() {
        let mut backoff = Backoff::new(policy());
        let ms = Duration::from_millis;
        assert_eq!(backoff.next_wait(Some(Duration::ZERO)), Some(ms(100)));
        assert_eq!(backoff.next_wait(Some(ms(150))), Some(ms(200)));
        assert_eq!(backoff.next_wait(Some(ms(7000))), Some(ms(7000)));
    }

    #[tokio::test(start_paused = true)]
    async fn no_wait_is_given_past_the_maximum_elapsed_time() {
        let mut backoff = Backoff::new(BackoffPolicy {
            max_elapsed: Some(Duration::from_millis(350)),
            ..policy()
        });
        assert_eq!(backoff.next_wait(None), Some(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(backoff.next_wait(None), Some(Duration::from_millis(200)));
        tokio::time::advance(Duration::from_millis(200)).await;
        // 300 ms gone, the next wait (400 ms) would end past 350 ms.
        assert_eq!(backoff.next_wait(None), None);
    }

    #[test]
    fn randomized_waits_stay_within_the_factor() {
        for _ in 0..1000 {
            let wait = randomized(Duration::from_millis(1000), 0.5);
            assert!((500..=1500).contains(&wait.as_millis()), "{wait:?}");
        }
    }
}
