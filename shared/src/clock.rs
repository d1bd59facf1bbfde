//! Time as a dependency. Every rule that depends on time (leases, backoff,
//! delays, schedules, retention) reads it from a [`Clock`], so tests move time
//! forward instead of sleeping.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, SubsecRound, Utc};

/// A source of the current time. Cloning is shallow.
#[derive(Clone, Debug)]
pub enum Clock {
    /// The system clock.
    System,
    /// A clock that only moves when a test moves it.
    Manual(Arc<Mutex<DateTime<Utc>>>),
}

impl Clock {
    /// A manual clock starting at `start`.
    pub fn manual(start: DateTime<Utc>) -> Self {
        Clock::Manual(Arc::new(Mutex::new(start.trunc_subsecs(6))))
    }

    /// The current time, to the microsecond (Postgres's precision, so a
    /// time read back from a row equals the one written).
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now().trunc_subsecs(6),
            Clock::Manual(t) => *t.lock().expect("clock mutex poisoned"),
        }
    }

    /// Moves a manual clock forward; the system clock cannot be moved.
    pub fn advance(&self, by: Duration) {
        match self {
            Clock::System => panic!("the system clock cannot be advanced"),
            Clock::Manual(t) => *t.lock().expect("clock mutex poisoned") += by,
        }
    }
}
