//! Retention: which backups of a folder a prune keeps, by the rules of Proxmox Backup Server.
//!
//! A backup folder grows by one point per run; without pruning it only grows. The rules here
//! are PBS's prune options (keep-last, keep-hourly, keep-daily, keep-weekly, keep-monthly,
//! keep-yearly) with PBS's semantics, so a schedule a user already runs with PBS (and the PBS
//! prune simulator they may have planned it with) keeps the same points here. The rules only
//! name points; what keeping a point costs in a chain (the files it depends on) is the
//! caller's business.
//!
//! PBS's algorithm (`pbs-datastore/src/prune.rs`, `compute_prune_info` and `mark_selections`):
//! points are walked newest first, once per rule in the order last, hourly, daily, weekly,
//! monthly, yearly. Each rule maps a point to a period (its local hour, day, ISO week, month,
//! year; for keep-last the point itself) and
//! - skips points an earlier rule has already decided on,
//! - skips points whose period already holds a point an earlier rule kept (the period is
//!   covered, and the point stays open for the later rules),
//! - keeps the newest point of each new period, and removes the older points of a period it
//!   kept a point of (for good: no later rule sees them again),
//! - stops at the first new period once it has kept its count.
//!
//! Points no rule keeps go. A policy with no rule set keeps everything (PBS's `keep_all`).

use std::collections::HashSet;

/// One retention rule of a policy, as the reason a point is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    /// The rules in the order PBS applies them.
    const ALL: [Rule; 6] = [
        Rule::Last,
        Rule::Hourly,
        Rule::Daily,
        Rule::Weekly,
        Rule::Monthly,
        Rule::Yearly,
    ];

    /// The rule's name in PBS's options, without the `keep-` prefix.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
        }
    }

    /// The period of the point at `position` (newest first) with civil time `c`, comparable
    /// only with periods of the same rule. keep-last's period is the point itself: PBS uses
    /// the snapshot's time, which names a PBS snapshot uniquely, while points here may share
    /// an epoch and still count as separate backups.
    fn period(self, position: usize, c: &Civil) -> (i64, u32, u32, u32) {
        let year = i64::from(c.year);
        match self {
            Rule::Last => (position as i64, 0, 0, 0),
            Rule::Hourly => (year, c.month, c.day, c.hour),
            Rule::Daily => (year, c.month, c.day, 0),
            Rule::Weekly => (i64::from(c.iso_year), c.iso_week, 0, 0),
            Rule::Monthly => (year, c.month, 0, 0),
            Rule::Yearly => (year, 0, 0, 0),
        }
    }
}

/// How many periods each rule keeps; zero leaves a rule unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl Policy {
    fn count(&self, rule: Rule) -> u32 {
        match rule {
            Rule::Last => self.last,
            Rule::Hourly => self.hourly,
            Rule::Daily => self.daily,
            Rule::Weekly => self.weekly,
            Rule::Monthly => self.monthly,
            Rule::Yearly => self.yearly,
        }
    }

    fn count_mut(&mut self, rule: Rule) -> &mut u32 {
        match rule {
            Rule::Last => &mut self.last,
            Rule::Hourly => &mut self.hourly,
            Rule::Daily => &mut self.daily,
            Rule::Weekly => &mut self.weekly,
            Rule::Monthly => &mut self.monthly,
            Rule::Yearly => &mut self.yearly,
        }
    }

    /// No rule set: PBS then keeps everything; our prune refuses such a policy (the caller does).
    pub fn is_empty(&self) -> bool {
        Rule::ALL.iter().all(|&r| self.count(r) == 0)
    }

    /// "keep-last=3,keep-daily=7" (PBS's option names; the "keep-" prefix optional; spaces
    /// around commas allowed); Err names the bad part. A rule given twice is an error. Zero is
    /// allowed here (the caller refuses an all-zero policy).
    pub fn parse(spec: &str) -> Result<Policy, String> {
        let mut policy = Policy::default();
        let mut given = Vec::new();
        for part in spec.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(format!("empty rule in retention policy {spec:?}"));
            }
            let Some((name, value)) = part.split_once('=') else {
                return Err(format!("{part:?}: expected keep-RULE=COUNT"));
            };
            let (name, value) = (name.trim(), value.trim());
            let bare = name.strip_prefix("keep-").unwrap_or(name);
            let Some(rule) = Rule::ALL.into_iter().find(|r| r.name() == bare) else {
                return Err(format!(
                    "{part:?}: unknown rule {name:?} (rules: keep-last, keep-hourly, \
                     keep-daily, keep-weekly, keep-monthly, keep-yearly)"
                ));
            };
            if given.contains(&rule) {
                return Err(format!("{part:?}: keep-{} given twice", rule.name()));
            }
            given.push(rule);
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{part:?}: the count must be a whole number, 0 or more"
                ));
            }
            *policy.count_mut(rule) = value
                .parse()
                .map_err(|_| format!("{part:?}: count too large"))?;
        }
        Ok(policy)
    }

    /// The rules as PBS's options, e.g. "keep-last=3, keep-daily=7" (only the non-zero ones),
    /// for messages; empty for an empty policy.
    pub fn describe(&self) -> String {
        Rule::ALL
            .iter()
            .filter(|&&r| self.count(r) > 0)
            .map(|&r| format!("keep-{}={}", r.name(), self.count(r)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Policy, String> {
        Policy::parse(s)
    }
}

/// Civil (calendar) fields of an instant, as a rule compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i32,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// The ISO 8601 week-numbering year (strftime's `%G`), which differs from `year` in the
    /// first and last days of some years.
    pub iso_year: i32,
    /// 1..=53 (strftime's `%V`).
    pub iso_week: u32,
}

/// The C library's conversion of an epoch into a broken-down time.
type Convert = unsafe extern "C" fn(*const libc::time_t, *mut libc::tm) -> *mut libc::tm;

impl Civil {
    /// In the local time zone (libc::localtime_r, as src/store/time.rs does).
    pub fn local(epoch: u64) -> Civil {
        Civil::convert(epoch, libc::localtime_r)
    }

    /// In UTC (libc::gmtime_r): for tests, which must not depend on the machine's zone.
    pub fn utc(epoch: u64) -> Civil {
        Civil::convert(epoch, libc::gmtime_r)
    }

    /// An instant the C library cannot convert (its year does not fit an `int`) is taken as
    /// the last hour of year `i32::MAX`: all such points share every period.
    fn convert(epoch: u64, convert: Convert) -> Civil {
        let beyond = Civil {
            year: i32::MAX,
            month: 12,
            day: 31,
            hour: 23,
            iso_year: i32::MAX,
            iso_week: 53,
        };
        let Ok(t) = libc::time_t::try_from(epoch) else {
            return beyond;
        };
        // SAFETY: the conversion writes into the tm we own; a zeroed tm is a valid initial value.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        if unsafe { convert(&t, &mut tm) }.is_null() {
            return beyond;
        }
        let year = tm.tm_year + 1900;
        let (iso_year, iso_week) = iso_week(year, tm.tm_yday, tm.tm_wday);
        Civil {
            year,
            month: (tm.tm_mon + 1) as u32,
            day: tm.tm_mday as u32,
            hour: tm.tm_hour as u32,
            iso_year,
            iso_week,
        }
    }
}

/// ISO 8601 year and week of the day `yday` (0-based day of `year`) that falls on `wday`
/// (0 = Sunday, as in `struct tm`). Weeks start on Monday; week 1 is the one holding the
/// year's first Thursday, so early January may belong to the previous year's last week and
/// late December to the next year's week 1.
fn iso_week(year: i32, yday: i32, wday: i32) -> (i32, u32) {
    let weekday = (wday + 6) % 7 + 1; // 1 = Monday .. 7 = Sunday
    let week = (yday + 1 - weekday + 10) / 7;
    if week < 1 {
        (year - 1, iso_weeks(year - 1))
    } else if week as u32 > iso_weeks(year) {
        (year + 1, 1)
    } else {
        (year, week as u32)
    }
}

/// 53 if the ISO year `year` has 53 weeks (it ends on a Thursday, or the year before ended
/// on a Wednesday), else 52.
fn iso_weeks(year: i32) -> u32 {
    // Weekday of 31 December, 0 = Sunday, by the Gregorian day count.
    let dec31 =
        |y: i64| (y + y.div_euclid(4) - y.div_euclid(100) + y.div_euclid(400)).rem_euclid(7);
    let y = i64::from(year);
    if dec31(y) == 4 || dec31(y - 1) == 3 {
        53
    } else {
        52
    }
}

/// Where a point stands while the rules run (PBS's marks, without the ones for protected and
/// unfinished snapshots, which a backup folder does not have).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// No rule has decided on it yet.
    Open,
    Kept(Rule),
    /// An older point of a period a rule kept a point of: no later rule may keep it.
    Removed,
}

/// For each of `epochs` (any order; equal epochs allowed and each treated as its own backup,
/// the one listed later counting as newer), the rule that keeps it, or None: it goes.
/// With an empty policy every point is kept with Rule::Last.
pub fn select(epochs: &[u64], policy: &Policy, civil: impl Fn(u64) -> Civil) -> Vec<Option<Rule>> {
    if policy.is_empty() {
        return vec![Some(Rule::Last); epochs.len()];
    }
    // Newest first: by epoch, then by place in the list.
    let mut order: Vec<usize> = (0..epochs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse((epochs[i], i)));
    let civils: Vec<Civil> = order.iter().map(|&i| civil(epochs[i])).collect();

    let mut marks = vec![Mark::Open; order.len()];
    for rule in Rule::ALL {
        // A rule with count 0 keeps nothing and removes nothing, in PBS too.
        let count = policy.count(rule) as usize;
        if count == 0 {
            continue;
        }
        let period = |p: usize| rule.period(p, &civils[p]);
        let covered: HashSet<_> = marks
            .iter()
            .enumerate()
            .filter(|(_, m)| matches!(m, Mark::Kept(_)))
            .map(|(p, _)| period(p))
            .collect();
        let mut kept = HashSet::new();
        for (p, mark) in marks.iter_mut().enumerate() {
            if *mark != Mark::Open {
                continue;
            }
            let id = period(p);
            if covered.contains(&id) {
                continue;
            }
            if kept.contains(&id) {
                *mark = Mark::Removed;
                continue;
            }
            if kept.len() >= count {
                break;
            }
            kept.insert(id);
            *mark = Mark::Kept(rule);
        }
    }

    let mut result = vec![None; epochs.len()];
    for (&i, mark) in order.iter().zip(marks) {
        if let Mark::Kept(rule) = mark {
            result[i] = Some(rule);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::time::{local_time, parse_time};

    fn at(s: &str) -> u64 {
        parse_time(s).unwrap_or_else(|| panic!("test time {s}"))
    }

    fn policy(spec: &str) -> Policy {
        Policy::parse(spec).unwrap_or_else(|e| panic!("test policy {spec}: {e}"))
    }

    /// The rule keeping each of `times` (UTC) under `spec`.
    fn rules(times: &[&str], spec: &str) -> Vec<Option<Rule>> {
        let epochs: Vec<u64> = times.iter().map(|t| at(t)).collect();
        select(&epochs, &policy(spec), Civil::utc)
    }

    /// The points of `times` kept (or, with `kept` false, removed) under `spec`, in list order.
    fn split<'a>(times: &[&'a str], spec: &str, kept: bool) -> Vec<&'a str> {
        let rules = rules(times, spec);
        times
            .iter()
            .zip(rules)
            .filter(|(_, r)| r.is_some() == kept)
            .map(|(t, _)| *t)
            .collect()
    }

    fn civil(s: &str) -> Civil {
        Civil::utc(at(s))
    }

    #[test]
    fn iso_weeks_of_known_dates() {
        for (date, year, week) in [
            ("2021-01-03T12:00Z", 2020, 53),
            ("2021-01-04T12:00Z", 2021, 1),
            ("2024-12-29T12:00Z", 2024, 52),
            ("2024-12-30T12:00Z", 2025, 1),
            ("2026-12-31T12:00Z", 2026, 53),
            ("2027-01-01T12:00Z", 2026, 53),
            ("2027-01-04T00:00Z", 2027, 1),
            // 2004 is a leap year that starts on a Thursday and ends on a Friday.
            ("2004-12-31T12:00Z", 2004, 53),
            ("2005-01-02T12:00Z", 2004, 53),
            ("2005-01-03T12:00Z", 2005, 1),
            ("2008-12-29T12:00Z", 2009, 1),
        ] {
            let c = civil(date);
            assert_eq!((c.iso_year, c.iso_week), (year, week), "{date}");
        }
        let c = civil("2019-11-15T09:39:15Z");
        assert_eq!((c.year, c.month, c.day, c.hour), (2019, 11, 15, 9));
    }

    /// Every day from 1970 to 2100 against the C library's own `%G/%V`.
    #[test]
    fn iso_weeks_match_strftime() {
        for day in 0..(131 * 366) {
            let epoch = day * 86_400 + 43_200;
            let t = epoch as libc::time_t;
            // SAFETY: gmtime_r and strftime write only into the tm and buffer we own.
            let mut tm: libc::tm = unsafe { std::mem::zeroed() };
            assert!(!unsafe { libc::gmtime_r(&t, &mut tm) }.is_null());
            let mut buf = [0u8; 32];
            let n = unsafe {
                libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c"%G/%V".as_ptr(), &tm)
            };
            let want = std::str::from_utf8(&buf[..n]).expect("strftime writes ASCII");
            let c = Civil::utc(epoch);
            assert_eq!(
                format!("{}/{:02}", c.iso_year, c.iso_week),
                want,
                "epoch {epoch}"
            );
        }
    }

    #[test]
    fn local_fields_follow_local_time() {
        for epoch in [0, 1_700_000_000, 1_711_846_800, 1_729_990_800] {
            let c = Civil::local(epoch);
            let want = local_time(epoch as i64);
            let got = format!("{:04}-{:02}-{:02} {:02}", c.year, c.month, c.day, c.hour);
            assert_eq!(got, want[..13], "epoch {epoch}");
        }
        assert_eq!(Civil::utc(u64::MAX).year, i32::MAX);
    }

    // The expectations of the next three tests are PBS's own, from its tests/prune.rs
    // (test_prune_hourly, test_prune_simple2, test_prune_simple), translated case by case.
    // PBS computes local-time periods there; these use UTC, which its times are written in.

    #[test]
    fn pbs_prune_hourly() {
        let list = [
            "2019-11-15T09:39:15Z",
            "2019-11-15T10:49:15Z",
            "2019-11-15T10:59:15Z",
            "2019-11-15T11:39:15Z",
            "2019-11-15T11:49:15Z",
            "2019-11-15T11:59:15Z",
        ];
        assert_eq!(
            split(&list, "keep-hourly=3", false),
            [
                "2019-11-15T10:49:15Z",
                "2019-11-15T11:39:15Z",
                "2019-11-15T11:49:15Z"
            ]
        );
        assert_eq!(
            split(&list, "keep-hourly=2", true),
            ["2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"]
        );
    }

    #[test]
    fn pbs_prune_simple2() {
        let list = [
            "2018-11-15T11:59:15Z",
            "2019-11-15T11:59:15Z",
            "2019-11-21T11:59:15Z",
            "2019-11-22T11:59:15Z",
            "2019-11-29T11:59:15Z",
            "2019-12-01T11:59:15Z",
            "2019-12-02T11:59:15Z",
            "2019-12-03T11:59:15Z",
            "2019-12-04T11:59:15Z",
        ];
        let kept = |spec| split(&list, spec, true);
        assert_eq!(kept("keep-daily=1"), ["2019-12-04T11:59:15Z"]);
        assert_eq!(
            kept("keep-last=1,keep-daily=1"),
            ["2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]
        );
        assert_eq!(
            kept("keep-daily=1,keep-weekly=1"),
            ["2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"]
        );
        assert_eq!(
            kept("keep-daily=1,keep-weekly=1,keep-monthly=1"),
            [
                "2019-11-22T11:59:15Z",
                "2019-12-01T11:59:15Z",
                "2019-12-04T11:59:15Z"
            ]
        );
        assert_eq!(
            kept("keep-monthly=1,keep-yearly=1"),
            ["2018-11-15T11:59:15Z", "2019-12-04T11:59:15Z"]
        );
    }

    #[test]
    fn pbs_prune_simple() {
        let list = [
            "2019-12-02T11:59:15Z",
            "2019-12-03T11:59:15Z",
            "2019-12-04T11:59:15Z",
            "2019-12-04T12:59:15Z",
        ];
        let removed = |spec| split(&list, spec, false);
        let none: [&str; 0] = [];
        assert_eq!(removed("keep-last=4"), none);
        assert_eq!(removed("keep-last=3"), ["2019-12-02T11:59:15Z"]);
        assert_eq!(
            removed("keep-last=2"),
            ["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z"]
        );
        assert_eq!(removed("keep-last=1"), &list[..3]);
        // PBS's compute_prune_info marks all four removed for keep-last=0, but its prune
        // (api2/admin/datastore.rs, prune_group) then keeps everything, as `keep_all` (no
        // option above zero) says: what a user sees is that nothing goes.
        assert_eq!(removed("keep-last=0"), none);
        assert_eq!(removed("keep-last=2,keep-daily=2"), none);
        assert_eq!(removed("keep-daily=3"), ["2019-12-04T11:59:15Z"]);
        assert_eq!(
            removed("keep-daily=2"),
            ["2019-12-02T11:59:15Z", "2019-12-04T11:59:15Z"]
        );
        // All in one ISO week, one month, one year: one point is kept.
        for spec in [
            "keep-weekly=5",
            "keep-daily=1,keep-weekly=5",
            "keep-monthly=6",
            "keep-yearly=7",
            "keep-weekly=5,keep-monthly=6,keep-yearly=7",
        ] {
            assert_eq!(removed(spec), &list[..3], "{spec}");
        }
    }

    #[test]
    fn keep_last_only() {
        // Out of order, with two points at one epoch: the later listed is the newer.
        let epochs = [300, 100, 500, 400, 500, 200];
        let last = |n| {
            select(
                &epochs,
                &Policy {
                    last: n,
                    ..Policy::default()
                },
                Civil::utc,
            )
        };
        let l = Some(Rule::Last);
        assert_eq!(last(1), [None, None, None, None, l, None]);
        assert_eq!(last(2), [None, None, l, None, l, None]);
        assert_eq!(last(4), [l, None, l, l, l, None]);
        assert_eq!(last(9), [l; 6]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        let list = [
            "2024-03-01T08:00Z",
            "2024-03-01T20:00Z",
            "2024-03-02T23:59Z",
            "2024-03-02T00:00Z",
            "2024-03-02T12:00Z",
            "2024-03-03T06:00Z",
            "2024-03-03T07:00Z",
        ];
        let d = Some(Rule::Daily);
        assert_eq!(
            rules(&list, "keep-daily=2"),
            [None, None, d, None, None, None, d]
        );
        assert_eq!(rules(&list, "daily=3"), [None, d, d, None, None, None, d]);
    }

    #[test]
    fn weekly_across_a_year_boundary() {
        // 2020-12-31 and 2021-01-03 are both in ISO week 2020-W53.
        let list = [
            "2020-12-27T10:00Z", // 2020-W52
            "2020-12-31T10:00Z", // 2020-W53
            "2021-01-03T10:00Z", // 2020-W53
            "2021-01-05T10:00Z", // 2021-W01
        ];
        let w = Some(Rule::Weekly);
        assert_eq!(rules(&list, "keep-weekly=2"), [None, None, w, w]);
        assert_eq!(rules(&list, "keep-weekly=3"), [w, None, w, w]);
    }

    #[test]
    fn keep_last_covers_its_days_for_daily() {
        // Follows PBS: a day keep-last kept a point of is covered, so keep-daily spends none of
        // its three days on it and goes on to the three days before.
        let list = [
            "2024-05-01T10:00Z",
            "2024-05-02T10:00Z",
            "2024-05-03T10:00Z",
            "2024-05-04T10:00Z",
            "2024-05-04T20:00Z",
            "2024-05-05T08:00Z",
            "2024-05-05T20:00Z",
        ];
        let (l, d) = (Some(Rule::Last), Some(Rule::Daily));
        assert_eq!(
            rules(&list, "keep-last=2,keep-daily=3"),
            [None, d, d, None, d, l, l]
        );
        // keep-last=1 leaves the 5th's morning point open, but its day is covered.
        assert_eq!(
            rules(&list, "keep-last=1,keep-daily=3"),
            [None, d, d, None, d, None, l]
        );
    }

    #[test]
    fn covered_points_stay_open_and_removed_ones_do_not() {
        // Covered: keep-daily keeps Wednesday, so keep-weekly skips that ISO week (its
        // Tuesday stays unkept) and keeps an older week.
        let list = [
            "2020-11-27T09:00Z",
            "2020-12-08T09:00Z",
            "2020-12-09T09:00Z",
        ];
        let (d, w, m) = (Some(Rule::Daily), Some(Rule::Weekly), Some(Rule::Monthly));
        assert_eq!(rules(&list, "keep-daily=1,keep-weekly=2"), [w, None, d]);
        // Removed: keep-weekly keeps Wednesday 2 December and removes Monday 30 November of
        // the same week (2020-W49), so keep-monthly takes November's older point, as PBS's
        // mark_selections marks the older points of a kept period removed.
        let list = [
            "2020-11-20T09:00Z",
            "2020-11-30T09:00Z",
            "2020-12-02T09:00Z",
        ];
        assert_eq!(rules(&list, "keep-weekly=1,keep-monthly=2"), [m, None, w]);
    }

    #[test]
    fn empty_policy_keeps_all() {
        let epochs = [5, 1, 5, 3];
        assert_eq!(
            select(&epochs, &Policy::default(), Civil::utc),
            [Some(Rule::Last); 4]
        );
        assert_eq!(select(&[], &policy("keep-daily=2"), Civil::utc), []);
        assert!(policy("keep-last=0, keep-yearly=0").is_empty());
        assert!(!policy("keep-yearly=1").is_empty());
    }

    #[test]
    fn parse_and_describe() {
        let p = policy(" keep-last=3 , daily = 7,keep-yearly=0 ");
        assert_eq!(
            p,
            Policy {
                last: 3,
                daily: 7,
                ..Policy::default()
            }
        );
        assert_eq!(p.describe(), "keep-last=3, keep-daily=7");
        let all: Policy = "yearly=6,monthly=5,weekly=4,daily=3,hourly=2,last=1"
            .parse()
            .expect("policy");
        assert_eq!(
            all.describe(),
            "keep-last=1, keep-hourly=2, keep-daily=3, keep-weekly=4, keep-monthly=5, keep-yearly=6"
        );
        assert_eq!(policy(&all.describe()), all);
        assert_eq!(Policy::default().describe(), "");
    }

    #[test]
    fn parse_errors_name_the_bad_part() {
        for (spec, part, why) in [
            (
                "keep-last=3,keep-fortnightly=2",
                "keep-fortnightly=2",
                "unknown rule",
            ),
            ("keep-last=3,keep-Daily=2", "keep-Daily=2", "unknown rule"),
            ("keep-daily", "keep-daily", "expected"),
            ("keep-daily=", "keep-daily=", "whole number"),
            ("keep-last=1,keep-daily=2,last=3", "last=3", "twice"),
            ("keep-last=-1", "keep-last=-1", "whole number"),
            ("keep-last=+1", "keep-last=+1", "whole number"),
            ("keep-last=1.5", "keep-last=1.5", "whole number"),
            (
                "keep-last=99999999999",
                "keep-last=99999999999",
                "too large",
            ),
        ] {
            let err = Policy::parse(spec).expect_err(spec);
            assert!(err.contains(&format!("{part:?}")), "{spec}: {err}");
            assert!(err.contains(why), "{spec}: {err}");
        }
        for spec in ["", "keep-last=1,", "keep-last=1,,keep-daily=1"] {
            let err = Policy::parse(spec).expect_err(spec);
            assert!(err.contains("empty rule"), "{spec:?}: {err}");
        }
    }
}
