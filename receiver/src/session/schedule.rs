//! `spec.schedule` of a TraceSession: a cron pattern (UTC) whose firings each start a run of
//! the session's `duration`. Standard five fields (`*/5 * * * *`: minute, hour, day of month,
//! month, day of week), or six with seconds first (`*/20 * * * * *`), and the `@hourly`-style
//! nicknames.
//!
//! Every node computes the firings from the same pattern and the object's creation time, so the
//! nodes agree on when each run starts and ends, and on its number, without talking to each other.

use std::time::{Duration, SystemTime};

use croner::parser::{CronParser, Seconds};
use croner::Cron;
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
}

/// One firing's run: from its firing to `duration` later, cut at the next firing if that comes
/// first (runs never overlap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunWindow {
    pub start: SystemTime,
    pub end: SystemTime,
}

impl Schedule {
    /// The pattern parsed, or why it is not one.
    pub fn parse(pattern: &str) -> Result<Schedule, String> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(pattern)
            .map_err(|e| e.to_string())?;
        Ok(Schedule { cron })
    }

    /// The run of the last firing after `created` and at or before `now`; `None` before the
    /// first firing.
    pub fn last_run(
        &self,
        created: SystemTime,
        now: SystemTime,
        duration: Duration,
    ) -> Option<RunWindow> {
        let start = from_zoned(
            &self
                .cron
                .find_previous_occurrence(&to_zoned(now)?, true)
                .ok()?,
        );
        if start <= created {
            return None;
        }
        let end = match self.next_firing(start) {
            Some(next) => (start + duration).min(next),
            None => start + duration,
        };
        Some(RunWindow { start, end })
    }

    /// The first firing after `after`.
    pub fn next_firing(&self, after: SystemTime) -> Option<SystemTime> {
        let next = self
            .cron
            .find_next_occurrence(&to_zoned(after)?, false)
            .ok()?;
        Some(from_zoned(&next))
    }

    /// How many firings there were after `after` up to `until` (both given to the second).
    pub fn firings(&self, after: SystemTime, until: SystemTime) -> u64 {
        let mut count = 0;
        let mut at = after;
        while let Some(next) = self.next_firing(at).filter(|next| *next <= until) {
            count += 1;
            at = next;
        }
        count
    }
}

/// `time` in UTC, to the second (cron patterns have no finer unit).
fn to_zoned(time: SystemTime) -> Option<Zoned> {
    let seconds = time.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    let timestamp = Timestamp::from_second(i64::try_from(seconds).ok()?).ok()?;
    Some(timestamp.to_zoned(TimeZone::UTC))
}

fn from_zoned(time: &Zoned) -> SystemTime {
    SystemTime::from(time.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn each_firing_after_creation_runs_for_the_duration_cut_at_the_next_one() {
        // Every 15 s, with a seconds field; created at :07 of a minute.
        let every_15s = Schedule::parse("*/15 * * * * *").unwrap();
        // 1_800_000_000 s is 08:00:00 UTC, a whole minute and hour.
        let minute = 1_800_000_000;
        let created = at(minute + 7);
        let ten = Duration::from_secs(10);
        assert_eq!(every_15s.last_run(created, at(minute + 14), ten), None);
        let first = RunWindow {
            start: at(minute + 15),
            end: at(minute + 25),
        };
        assert_eq!(
            every_15s.last_run(created, at(minute + 15), ten),
            Some(first)
        );
        // After the run, until the next firing, the last run is still that one.
        assert_eq!(
            every_15s.last_run(created, at(minute + 29), ten),
            Some(first)
        );
        // A duration longer than the interval is cut at the next firing.
        assert_eq!(
            every_15s.last_run(created, at(minute + 31), Duration::from_secs(60)),
            Some(RunWindow {
                start: at(minute + 30),
                end: at(minute + 45)
            })
        );
        assert_eq!(
            every_15s.next_firing(at(minute + 31)),
            Some(at(minute + 45))
        );
        assert_eq!(every_15s.firings(created, at(minute + 14)), 0);
        assert_eq!(every_15s.firings(created, at(minute + 45)), 3);
    }

    #[test]
    fn five_fields_are_minutes_and_nicknames_work() {
        let hourly = Schedule::parse("@hourly").unwrap();
        let hour = 1_800_000_000;
        assert_eq!(hourly.next_firing(at(hour + 1)), Some(at(hour + 3600)));
        let five_minutes = Schedule::parse("*/5 * * * *").unwrap();
        assert_eq!(five_minutes.next_firing(at(hour + 1)), Some(at(hour + 300)));
        assert!(Schedule::parse("every minute").is_err());
        assert!(Schedule::parse("61 * * * *").is_err());
    }
}
