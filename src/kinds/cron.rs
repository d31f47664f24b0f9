//! Cron schedules as CronJobs write them: five fields (minute, hour, day of month, month, day
//! of week) with `*`, lists, ranges, steps and month/day names, `?` for "any", the `@hourly`
//! family of macros, evaluated in a time zone. Day of month and day of week, when both are
//! restricted, match either (as cron and kube's parser do).

use jiff::{Timestamp, ToSpan, civil::DateTime, tz::TimeZone};

/// A parsed schedule: which values each field allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Day of month / of week were `*` (or `?`).
    any_day: bool,
    any_weekday: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn value(s: &str, names: &[&str], offset: u32) -> Result<u32, String> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(i as u32 + offset);
    }
    s.parse::<u32>()
        .map_err(|_| format!("failed to parse int from {s}"))
}

/// One field: a bit set of the allowed values in `lo..=hi`.
fn field(spec: &str, lo: u32, hi: u32, names: &[&str], offset: u32) -> Result<(u64, bool), String> {
    let mut bits = 0u64;
    let mut any = false;
    for part in spec.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("failed to parse int from {s}"))?;
                if step == 0 {
                    return Err(format!("step of range should be a positive number: {part}"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (start, end) = if range == "*" || range == "?" {
            any = step == 1 && spec == range;
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a, names, offset)?, value(b, names, offset)?)
        } else {
            let v = value(range, names, offset)?;
            (v, if part.contains('/') { hi } else { v })
        };
        if start < lo {
            return Err(format!(
                "beginning of range ({start}) below minimum ({lo}): {part}"
            ));
        }
        if end > hi {
            return Err(format!("end of range ({end}) above maximum ({hi}): {part}"));
        }
        if start > end {
            return Err(format!(
                "beginning of range ({start}) beyond end of range ({end}): {part}"
            ));
        }
        let mut v = start;
        while v <= end {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, any))
}

impl Schedule {
    pub fn parse(spec: &str) -> Result<Schedule, String> {
        let spec = spec.trim();
        if spec.starts_with("TZ=") || spec.starts_with("CRON_TZ=") {
            return Err("cannot use TZ or CRON_TZ in schedule, use timeZone field instead".into());
        }
        let expanded = match spec {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            s if s.starts_with('@') => return Err(format!("unrecognized descriptor: {s}")),
            s => s,
        };
        let f: Vec<&str> = expanded.split_whitespace().collect();
        if f.len() != 5 {
            return Err(format!(
                "expected exactly 5 fields, found {}: [{}]",
                f.len(),
                f.join(" ")
            ));
        }
        let (minutes, _) = field(f[0], 0, 59, &[], 0)?;
        let (hours, _) = field(f[1], 0, 23, &[], 0)?;
        let (days, any_day) = field(f[2], 1, 31, &[], 0)?;
        let (months, _) = field(f[3], 1, 12, &MONTHS, 1)?;
        let (mut weekdays, any_weekday) = field(f[4], 0, 7, &WEEKDAYS, 0)?;
        // 7 is Sunday too.
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1;
        }
        Ok(Schedule {
            minutes,
            hours,
            days,
            months,
            weekdays,
            any_day,
            any_weekday,
        })
    }

    fn day_matches(&self, d: DateTime) -> bool {
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().to_sunday_zero_offset()) != 0;
        match (self.any_day, self.any_weekday) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        }
    }

    /// The first scheduled time after `t` in `tz` (None if none within five years).
    pub fn next(&self, t: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let local = t.to_zoned(tz.clone()).datetime();
        // The next whole minute.
        let mut d = local
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(1.minute())
            .ok()?;
        let limit = local.checked_add(5.years()).ok()?;
        while d <= limit {
            if self.months & (1 << d.month()) == 0 {
                d = d
                    .first_of_month()
                    .checked_add(1.month())
                    .ok()?
                    .start_of_day();
                continue;
            }
            if !self.day_matches(d) {
                d = d
                    .date()
                    .checked_add(1.day())
                    .ok()?
                    .to_datetime(jiff::civil::Time::midnight());
                continue;
            }
            if self.hours & (1 << d.hour()) == 0 {
                d = d
                    .with()
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if self.minutes & (1 << d.minute()) == 0 {
                d = d.checked_add(1.minute()).ok()?;
                continue;
            }
            let z = d.to_zoned(tz.clone()).ok()?;
            // A local time skipped by a DST change lands later; keep only times after `t`.
            if z.timestamp() > t {
                return Some(z.timestamp());
            }
            d = d.checked_add(1.minute()).ok()?;
        }
        None
    }

    /// The scheduled times in (`after`, `until`], the latest last, at most `max + 1` of them
    /// (enough to tell "too many"; the last is then still the latest).
    pub fn times(
        &self,
        after: Timestamp,
        until: Timestamp,
        tz: &TimeZone,
        max: usize,
    ) -> Vec<Timestamp> {
        let mut out = vec![];
        let mut t = after;
        while let Some(n) = self.next(t, tz).filter(|n| *n <= until) {
            out.push(n);
            if out.len() > max {
                if let (Some(last), Some(l)) = (self.latest(after, until, tz), out.last_mut()) {
                    *l = last;
                }
                break;
            }
            t = n;
        }
        out
    }

    /// The latest scheduled time in (`after`, `until`]: looked for in widening windows back
    /// from `until`, so a frequent schedule long unmet costs a few steps, not one per miss.
    fn latest(&self, after: Timestamp, until: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        for hours in [1i64, 24, 24 * 32, 24 * 366, 24 * 366 * 5] {
            let from = until
                .checked_sub(jiff::SignedDuration::from_hours(hours))
                .unwrap_or(after)
                .max(after);
            let mut last = None;
            let mut t = from;
            while let Some(n) = self.next(t, tz).filter(|n| *n <= until) {
                last = Some(n);
                t = n;
            }
            if last.is_some() || from == after {
                return last;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn fields_macros_and_names() {
        let utc = TimeZone::UTC;
        let s = Schedule::parse("*/15 9-17 * * mon-fri").unwrap();
        // Saturday 2026-12-05 → Monday 09:00.
        assert_eq!(
            s.next(at("2026-12-05T12:00:00Z"), &utc),
            Some(at("2026-12-07T09:00:00Z"))
        );
        assert_eq!(
            s.next(at("2026-12-07T09:00:00Z"), &utc),
            Some(at("2026-12-07T09:15:00Z"))
        );
        let h = Schedule::parse("@hourly").unwrap();
        assert_eq!(
            h.next(at("2026-12-05T12:00:30Z"), &utc),
            Some(at("2026-12-05T13:00:00Z"))
        );
        let y = Schedule::parse("0 0 1 JAN ?").unwrap();
        assert_eq!(
            y.next(at("2026-12-05T00:00:00Z"), &utc),
            Some(at("2027-01-01T00:00:00Z"))
        );
        // Day of month OR day of week when both are given; 7 is Sunday.
        let e = Schedule::parse("0 0 13 * 7").unwrap();
        assert_eq!(
            e.next(at("2026-12-05T00:00:00Z"), &utc),
            Some(at("2026-12-06T00:00:00Z"))
        );
        assert_eq!(
            e.next(at("2026-12-07T00:00:00Z"), &utc),
            Some(at("2026-12-13T00:00:00Z"))
        );
        for bad in [
            "* * * *",
            "61 * * * *",
            "*/0 * * * *",
            "@often",
            "TZ=UTC * * * * *",
            "x * * * *",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn time_zones_and_missed_times() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let s = Schedule::parse("0 9 * * *").unwrap();
        // 09:00 in Berlin is 08:00 UTC in winter.
        assert_eq!(
            s.next(at("2026-12-05T12:00:00Z"), &berlin),
            Some(at("2026-12-06T08:00:00Z"))
        );
        let m = Schedule::parse("* * * * *").unwrap();
        let times = m.times(
            at("2026-12-05T12:00:00Z"),
            at("2026-12-05T12:03:30Z"),
            &TimeZone::UTC,
            100,
        );
        assert_eq!(times.len(), 3);
        assert_eq!(times[2], at("2026-12-05T12:03:00Z"));
        // More than the limit: limit + 1 entries, the last the latest.
        let times = m.times(
            at("2026-12-05T00:00:00Z"),
            at("2026-12-05T12:00:00Z"),
            &TimeZone::UTC,
            100,
        );
        assert_eq!(times.len(), 101);
        assert_eq!(*times.last().unwrap(), at("2026-12-05T12:00:00Z"));
    }
}
