//! When the dashboard tries to reach kmsd again, and whether by starting one: the
//! decisions only, with the times passed in, so that they are tested without waiting.
//!
//! Connecting is cheap and is retried often (250 ms doubling to 5 s). Starting a daemon
//! is not, and one that keeps dying must not be started in a tight loop: when the
//! dashboard may start one (as its launch did: the default socket, autostart not turned
//! off, not the system service's socket), it does so 1 s after the daemon went away (the
//! old one may still be letting go of its store) and then 2, 4… up to 30 s after each
//! start while the daemons started do not stay up; a connection that lasted 30 s resets
//! that. Between starts, attempts only connect (a daemon someone else started, or a
//! service manager restarted, is found then).

use std::time::{Duration, Instant};

pub const FIRST_CONNECT: Duration = Duration::from_millis(250);
pub const MAX_CONNECT: Duration = Duration::from_secs(5);
pub const FIRST_START: Duration = Duration::from_secs(1);
pub const MAX_START: Duration = Duration::from_secs(30);
/// A connection that lasted this long was to a daemon that works: the next start after
/// it is lost waits no longer than the first.
pub const STABLE: Duration = Duration::from_secs(30);

/// What an attempt does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Only connects.
    Connect,
    /// Connects, and starts kmsd if none answers.
    Start,
}

/// The next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub at: Instant,
    pub attempt: Attempt,
    /// When kmsd is next started, if the dashboard may start it (`at` if this attempt
    /// is that start).
    pub start_at: Option<Instant>,
}

/// What the user is told about the next attempt, counted from when it was planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Connecting again in this long.
    Connect(Duration),
    /// Starting kmsd again in this long (connecting meanwhile).
    Start(Duration),
}

impl Plan {
    pub fn next(&self, now: Instant) -> Next {
        match self.start_at {
            Some(at) => Next::Start(at.saturating_duration_since(now)),
            None => Next::Connect(self.at.saturating_duration_since(now)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retry {
    may_start: bool,
    connect_gap: Duration,
    /// The earliest next start; `None`: the next attempt may start one.
    next_start: Option<Instant>,
    /// The wait after the next start before the one after it.
    start_gap: Duration,
    connected_at: Option<Instant>,
}

impl Retry {
    pub fn new(may_start: bool) -> Retry {
        Retry {
            may_start,
            connect_gap: FIRST_CONNECT,
            next_start: None,
            start_gap: FIRST_START,
            connected_at: None,
        }
    }

    /// Whether the dashboard may start kmsd from now on (it learnt, connected, where the
    /// daemon keeps its store, and whether one started here could serve that store).
    pub fn allow_start(&mut self, may: bool) {
        self.may_start = may;
    }

    pub fn may_start(&self) -> bool {
        self.may_start
    }

    /// A start was attempted (it ended at `now`, whether a daemon answered or not).
    pub fn started(&mut self, now: Instant) {
        self.next_start = Some(now + self.start_gap);
        self.start_gap = (self.start_gap * 2).min(MAX_START);
    }

    /// A connection (with its subscription) was made at `now`.
    pub fn connected(&mut self, now: Instant) {
        self.connect_gap = FIRST_CONNECT;
        self.connected_at = Some(now);
    }

    /// The connection was lost at `now`. No daemon is started within [`FIRST_START`] of
    /// that. One that had lasted [`STABLE`] was to a daemon that works: the backoff
    /// begins again, as if the loss were the launch's start. A daemon that died sooner
    /// keeps the backoff where it was.
    pub fn lost(&mut self, now: Instant) {
        if self
            .connected_at
            .take()
            .is_some_and(|at| now.saturating_duration_since(at) >= STABLE)
        {
            self.next_start = None;
            self.start_gap = FIRST_START;
            self.started(now);
            return;
        }
        let soonest = now + FIRST_START;
        self.next_start = Some(self.next_start.map_or(soonest, |at| at.max(soonest)));
    }

    /// The next attempt, planned at `now` after a failed attempt or a lost connection.
    pub fn plan(&mut self, now: Instant) -> Plan {
        let connect_at = now + self.connect_gap;
        self.connect_gap = (self.connect_gap * 2).min(MAX_CONNECT);
        if !self.may_start {
            return Plan {
                at: connect_at,
                attempt: Attempt::Connect,
                start_at: None,
            };
        }
        let start_at = self.next_start.map_or(now, |at| at.max(now));
        if start_at <= connect_at {
            Plan {
                at: start_at,
                attempt: Attempt::Start,
                start_at: Some(start_at),
            }
        } else {
            Plan {
                at: connect_at,
                attempt: Attempt::Connect,
                start_at: Some(start_at),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Runs attempts that all fail at once from `t0` until `until`, and returns when each
    /// start was, relative to `t0`.
    fn starts_while_failing(r: &mut Retry, t0: Instant, until: Duration) -> Vec<Duration> {
        let mut starts = Vec::new();
        let mut now = t0;
        loop {
            let plan = r.plan(now);
            now = plan.at;
            if now - t0 > until {
                return starts;
            }
            if plan.attempt == Attempt::Start {
                starts.push(now - t0);
                r.started(now);
            }
        }
    }

    /// Without autostart, attempts only connect: 250 ms doubling to 5 s, and back to
    /// 250 ms once connected.
    #[test]
    fn without_autostart_it_only_reconnects() {
        let t0 = Instant::now();
        let mut r = Retry::new(false);
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..7 {
            let plan = r.plan(now);
            assert_eq!(plan.attempt, Attempt::Connect);
            assert_eq!(plan.start_at, None);
            assert_eq!(plan.next(now), Next::Connect(plan.at - now));
            gaps.push(plan.at - now);
            now = plan.at;
        }
        assert_eq!(
            gaps,
            [
                ms(250),
                ms(500),
                secs(1),
                secs(2),
                secs(4),
                secs(5),
                secs(5)
            ]
        );
        r.connected(now);
        r.lost(now + secs(60));
        let plan = r.plan(now + secs(60));
        assert_eq!(
            (plan.attempt, plan.at),
            (Attempt::Connect, now + secs(60) + ms(250))
        );
    }

    /// A daemon that keeps dying is started again 1 s after the launch's start, then 2,
    /// 4, 8, 16 and at most 30 s apart, never in a tight loop; attempts in between only
    /// connect.
    #[test]
    fn starts_back_off_from_one_to_thirty_seconds() {
        let t0 = Instant::now();
        let mut r = Retry::new(true);
        // The launch started one, which did not answer.
        r.started(t0);
        let starts = starts_while_failing(&mut r, t0, secs(130));
        assert_eq!(
            starts,
            [
                secs(1),
                secs(3),
                secs(7),
                secs(15),
                secs(31),
                secs(61),
                secs(91),
                secs(121)
            ]
        );
    }

    /// The daemon the launch started is killed 5 s later: one is started again 1 s after
    /// that (attempts before only connect), and the user is told when.
    #[test]
    fn a_killed_daemon_is_started_again() {
        let t0 = Instant::now();
        let mut r = Retry::new(true);
        r.started(t0);
        r.connected(t0);
        let killed = t0 + secs(5);
        r.lost(killed);
        let plan = r.plan(killed);
        assert_eq!(
            (plan.attempt, plan.at),
            (Attempt::Connect, killed + ms(250))
        );
        assert_eq!(plan.next(killed), Next::Start(secs(1)));
        let starts = starts_while_failing(&mut r, killed, secs(2));
        assert_eq!(starts, [secs(1)]);
    }

    /// Daemons that answer and then die within a second are still started with the
    /// backoff: being connected for a moment does not reset it.
    #[test]
    fn a_daemon_dying_soon_after_answering_keeps_the_backoff() {
        let t0 = Instant::now();
        let mut r = Retry::new(true);
        let mut now = t0;
        let mut starts = Vec::new();
        while now - t0 < secs(100) {
            let plan = r.plan(now);
            now = plan.at;
            if plan.attempt == Attempt::Start {
                starts.push(now - t0);
                r.started(now);
                r.connected(now);
                now += ms(500);
                r.lost(now);
            }
        }
        // Each at least 1 s after the loss and the backoff's gap after the start before.
        assert_eq!(
            starts,
            [
                Duration::ZERO,
                ms(1_500),
                ms(3_500),
                ms(7_500),
                ms(15_500),
                ms(31_500),
                ms(61_500),
                ms(91_500)
            ]
        );
    }

    /// Between starts the plan only connects, and says when the start comes.
    #[test]
    fn between_starts_it_connects_and_says_when_it_starts() {
        let t0 = Instant::now();
        let mut r = Retry::new(true);
        r.started(t0);
        let plan = r.plan(t0);
        assert_eq!(plan.attempt, Attempt::Connect);
        assert_eq!(plan.at, t0 + ms(250));
        assert_eq!(plan.start_at, Some(t0 + secs(1)));
        assert_eq!(plan.next(t0), Next::Start(secs(1)));
    }

    /// A connection that lasted 30 s resets the backoff: after a long backoff, a daemon
    /// that then ran for a while and died is started again 1 s later, then 2 s after
    /// that, as after the launch.
    #[test]
    fn a_stable_connection_resets_the_backoff() {
        let t0 = Instant::now();
        let mut r = Retry::new(true);
        r.started(t0);
        let _ = starts_while_failing(&mut r, t0, secs(130));
        let up = t0 + secs(200);
        r.started(up);
        r.connected(up);
        let died = up + STABLE;
        r.lost(died);
        let starts = starts_while_failing(&mut r, died, secs(8));
        assert_eq!(starts, [secs(1), secs(3), secs(7)]);
    }
}
