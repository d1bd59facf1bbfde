//! The retry policy, apart from any I/O: what becomes of a job whose
//! handler returned, decided from the outcome, the attempt and the cancel
//! flag alone. The worker applies the [`Action`] in a separate step.

use std::time::Duration;

use rand::Rng;
use serde_json::Value;

use crate::config::WorkerConfig;
use crate::handlers::{JobError, Outcome, WaitOn};
use crate::job::ErrorKind;
use crate::queue::MAX_VISIBILITY;

/// What to write for a job whose handler returned.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// `completed`, with its result.
    Complete(Option<Value>),
    /// `cancelled`, keeping what was done so far.
    Cancel(Option<Value>),
    /// Back to `pending` with this checkpoint and a fresh message.
    HandOff(Value),
    /// `waiting` with this checkpoint (or `pending` at once when the wait
    /// is already over).
    Wait { checkpoint: Value, on: WaitOn },
    /// Not run (a rate limit was empty, the database had no connection to
    /// give): back after the delay, attempt given back.
    Snooze(Duration),
    /// A failed attempt: back after the backoff, by `route`.
    Retry {
        delay: Duration,
        error: String,
        route: Route,
    },
    /// `dead`: a permanent error, or no attempts left.
    Bury { error: String, kind: ErrorKind },
    /// The lease was lost: this worker writes nothing.
    Drop,
}

/// How a retried job comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Its message is hidden for the backoff and reported failed.
    Visibility,
    /// A fresh message with the delay: the job came without a message, or
    /// one more receive would send its message to the dead-letter queue
    /// while it has attempts left.
    FreshMessage,
    /// Longer than a queue can hide a message: the scheduler sends it when due.
    Outbox,
}

/// What the policy needs to know of the run.
#[derive(Clone, Debug)]
pub struct Facts {
    /// The attempt that just ran (1-based) and the job's maximum.
    pub attempt: i32,
    pub max_attempts: i32,
    /// A cancel was requested (as the worker last read it; the statements
    /// check again).
    pub cancel_requested: bool,
    /// Receives of the message that delivered the job, if it came with one.
    pub receive_count: Option<u32>,
    pub max_receive_count: u32,
    /// Runs in a row before this one that found no database connection
    /// (each a snooze), and how many the worker allows before a busy run
    /// takes the retry path instead.
    pub busy_snoozes: i32,
    pub max_busy_snoozes: u32,
}

impl Facts {
    /// Whether a busy run now would be one too many in a row.
    fn past_busy_bound(&self) -> bool {
        self.busy_snoozes >= self.max_busy_snoozes as i32
    }
}

/// `result`, with a busy run past the bound of busy snoozes in a row made a
/// retryable failure: a database that stays at its limit then shows in the
/// job (its error, its attempts) and ends it in the end, instead of
/// snoozing it for ever with nothing recorded.
/// `None` when `result` stands as it is.
pub fn bounded(result: &Result<Outcome, JobError>, facts: &Facts) -> Option<JobError> {
    match result {
        Err(JobError::Busy(why)) if facts.past_busy_bound() => Some(JobError::Retryable(format!(
            "{why} ({} runs in a row found no free connection)",
            facts.busy_snoozes + 1
        ))),
        _ => None,
    }
}

/// Delay before retry number `attempt` (1-based): exponential from `base`,
/// capped, then jittered uniformly between half and all of that value. Pure
/// "full jitter" (zero to all) can retry a failing dependency at once; the
/// lower half-bound keeps every wait at least half the exponential step
/// while still spreading a burst of failures apart.
pub fn backoff(config: &WorkerConfig, attempt: i32, rng: &mut impl Rng) -> Duration {
    let exp = config
        .backoff_base
        .saturating_mul(2u32.saturating_pow(attempt.clamp(1, 31) as u32 - 1))
        .min(config.backoff_cap);
    jittered(exp, rng)
}

/// How long a job whose run returned `result` waits before it comes back:
/// the backoff of its attempt after a failure; about the batch-failure
/// delay when the database was busy (a short, jittered pause, since no
/// attempt was spent and the pool frees up in seconds).
pub fn delay_for(
    config: &WorkerConfig,
    result: &Result<Outcome, JobError>,
    facts: &Facts,
    rng: &mut impl Rng,
) -> Duration {
    match result {
        Err(JobError::Busy(_)) if !facts.past_busy_bound() => {
            jittered(config.batch_failure_delay, rng)
        }
        _ => backoff(config, facts.attempt, rng),
    }
}

/// Uniformly between half and all of `d`.
pub fn jittered(d: Duration, rng: &mut impl Rng) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(rng.random_range(ms / 2..=ms.max(1)))
}

/// The action for a handler's result. A cancel request wins over every way
/// of coming back (retry, snooze, hand-off); a completion or a permanent
/// failure is recorded as what it was. `delay` is how long a retry (or a
/// busy snooze) waits: see [`delay_for`]. A busy run past
/// `max_busy_snoozes` in a row is a retryable failure ([`bounded`]).
pub fn decide(
    result: &Result<Outcome, JobError>,
    checkpoint: Option<&Value>,
    facts: &Facts,
    delay: Duration,
) -> Action {
    let comes_back = |action: Action| {
        if facts.cancel_requested {
            Action::Cancel(None)
        } else {
            action
        }
    };
    let past_bound = bounded(result, facts).map(Err);
    match past_bound.as_ref().unwrap_or(result) {
        Ok(Outcome::Completed(r)) => Action::Complete(r.clone()),
        Ok(Outcome::Cancelled(partial)) => Action::Cancel(partial.clone()),
        Ok(Outcome::HandOff) => {
            comes_back(Action::HandOff(checkpoint.cloned().unwrap_or(Value::Null)))
        }
        Ok(Outcome::Snooze(delay)) => comes_back(Action::Snooze(*delay)),
        Ok(Outcome::Wait(on)) => comes_back(Action::Wait {
            checkpoint: checkpoint.cloned().unwrap_or(Value::Null),
            on: on.clone(),
        }),
        Err(JobError::Busy(_)) => comes_back(Action::Snooze(delay)),
        Err(JobError::LeaseLost) => Action::Drop,
        Err(JobError::Retryable(msg)) if facts.attempt < facts.max_attempts => {
            let route = if delay > MAX_VISIBILITY {
                Route::Outbox
            } else {
                match facts.receive_count {
                    Some(n) if n + 1 < facts.max_receive_count => Route::Visibility,
                    _ => Route::FreshMessage,
                }
            };
            comes_back(Action::Retry {
                delay,
                error: msg.clone(),
                route,
            })
        }
        Err(JobError::Retryable(msg)) => Action::Bury {
            error: format!(
                "{msg} (attempt {} of {}: no attempts left)",
                facts.attempt, facts.max_attempts
            ),
            kind: ErrorKind::Retryable,
        },
        Err(JobError::Permanent(msg)) => Action::Bury {
            error: msg.clone(),
            kind: ErrorKind::Permanent,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use serde_json::json;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let cfg = WorkerConfig {
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(60),
            ..WorkerConfig::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 1..=10 {
            let exp = (2u64 << (attempt - 1)).min(60);
            for _ in 0..50 {
                let d = backoff(&cfg, attempt, &mut rng).as_millis() as u64;
                assert!(d <= exp * 1000, "attempt {attempt}: {d}ms over {exp}s");
                assert!(
                    d >= exp * 500,
                    "attempt {attempt}: {d}ms under half of {exp}s"
                );
            }
        }
    }

    #[test]
    fn a_busy_database_waits_a_short_pause_whatever_the_attempt() {
        let cfg = WorkerConfig {
            backoff_base: Duration::from_secs(60),
            batch_failure_delay: Duration::from_secs(4),
            ..WorkerConfig::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let busy = Err(JobError::Busy("pool".into()));
        let failed = Err(JobError::Retryable("503".into()));
        for attempt in 1..=3 {
            let f = facts(attempt, false, Some(1));
            let d = delay_for(&cfg, &busy, &f, &mut rng);
            assert!(
                (Duration::from_secs(2)..=Duration::from_secs(4)).contains(&d),
                "{d:?}"
            );
            assert!(delay_for(&cfg, &failed, &f, &mut rng) >= Duration::from_secs(30));
        }
        // Past the bound of busy snoozes in a row: the backoff of a failure.
        let f = Facts {
            busy_snoozes: 10,
            ..facts(2, false, Some(1))
        };
        assert!(delay_for(&cfg, &busy, &f, &mut rng) >= Duration::from_secs(60));
    }

    fn facts(attempt: i32, cancel: bool, receives: Option<u32>) -> Facts {
        Facts {
            attempt,
            max_attempts: 3,
            cancel_requested: cancel,
            receive_count: receives,
            max_receive_count: 5,
            busy_snoozes: 0,
            max_busy_snoozes: 10,
        }
    }

    #[test]
    fn busy_runs_snooze_up_to_the_bound_then_take_the_retry_path() {
        let busy = Err(JobError::Busy("database busy: pool timed out".into()));
        let at = |n: i32, attempt: i32| Facts {
            busy_snoozes: n,
            ..facts(attempt, false, Some(1))
        };
        let s = Duration::from_secs;
        assert_eq!(decide(&busy, None, &at(9, 1), s(4)), Action::Snooze(s(4)));
        assert_eq!(
            decide(&busy, None, &at(10, 1), s(4)),
            Action::Retry {
                delay: s(4),
                error: "database busy: pool timed out (11 runs in a row found no free connection)"
                    .into(),
                route: Route::Visibility,
            }
        );
        // On the last attempt it is dead, with the reason.
        assert!(matches!(
            decide(&busy, None, &at(10, 3), s(4)),
            Action::Bury { ref error, kind: ErrorKind::Retryable } if error.contains("no free connection")
        ));
        // A cancel still wins.
        assert_eq!(
            decide(
                &busy,
                None,
                &Facts {
                    cancel_requested: true,
                    ..at(10, 1)
                },
                s(4)
            ),
            Action::Cancel(None)
        );
    }

    #[test]
    fn the_policy_as_a_table() {
        let s = Duration::from_secs;
        let retry = |route| Action::Retry {
            delay: s(4),
            error: "503".into(),
            route,
        };
        let cp = json!({"row": 7});
        #[rustfmt::skip]
        let table: Vec<(Result<Outcome, JobError>, Facts, Duration, Action)> = vec![
            (Ok(Outcome::Completed(Some(json!(1)))), facts(1, false, Some(1)), s(4), Action::Complete(Some(json!(1)))),
            // A completion stands even when a cancel came too late to stop it.
            (Ok(Outcome::Completed(None)), facts(1, true, Some(1)), s(4), Action::Complete(None)),
            (Ok(Outcome::Cancelled(Some(json!(3)))), facts(1, true, Some(1)), s(4), Action::Cancel(Some(json!(3)))),
            (Ok(Outcome::HandOff), facts(1, false, Some(1)), s(4), Action::HandOff(cp.clone())),
            (Ok(Outcome::HandOff), facts(1, true, Some(1)), s(4), Action::Cancel(None)),
            (Ok(Outcome::Snooze(s(9))), facts(1, false, None), s(4), Action::Snooze(s(9))),
            (Ok(Outcome::Snooze(s(9))), facts(1, true, None), s(4), Action::Cancel(None)),
            (Ok(Outcome::Wait(WaitOn::Children { fail_fast: true })), facts(1, false, Some(1)), s(4),
                Action::Wait { checkpoint: cp.clone(), on: WaitOn::Children { fail_fast: true } }),
            (Ok(Outcome::Wait(WaitOn::Token("t".into()))), facts(1, true, Some(1)), s(4), Action::Cancel(None)),
            // No connection came free: the job was not run, even on its last attempt.
            (Err(JobError::Busy("pool".into())), facts(3, false, Some(1)), s(4), Action::Snooze(s(4))),
            (Err(JobError::Busy("pool".into())), facts(1, true, Some(1)), s(4), Action::Cancel(None)),
            (Err(JobError::Retryable("503".into())), facts(1, false, Some(1)), s(4), retry(Route::Visibility)),
            // One more receive would reach maxReceiveCount: a fresh message.
            (Err(JobError::Retryable("503".into())), facts(2, false, Some(4)), s(4), retry(Route::FreshMessage)),
            // Taken from the parked jobs, without a message of its own.
            (Err(JobError::Retryable("503".into())), facts(1, false, None), s(4), retry(Route::FreshMessage)),
            (Err(JobError::Retryable("503".into())), facts(1, false, Some(1)), s(50_000),
                Action::Retry { delay: s(50_000), error: "503".into(), route: Route::Outbox }),
            (Err(JobError::Retryable("503".into())), facts(1, true, Some(1)), s(4), Action::Cancel(None)),
            (Err(JobError::Retryable("503".into())), facts(3, false, Some(1)), s(4),
                Action::Bury { error: "503 (attempt 3 of 3: no attempts left)".into(), kind: ErrorKind::Retryable }),
            (Err(JobError::Permanent("410".into())), facts(1, false, Some(1)), s(4),
                Action::Bury { error: "410".into(), kind: ErrorKind::Permanent }),
            (Err(JobError::LeaseLost), facts(1, true, Some(1)), s(4), Action::Drop),
        ];
        for (i, (result, facts, delay, want)) in table.into_iter().enumerate() {
            assert_eq!(
                decide(&result, Some(&cp), &facts, delay),
                want,
                "row {i}: {result:?} {facts:?}"
            );
        }
    }
}
